"""`model.base_dtype`: the frozen base stored in bf16 / int8 under LoRA (models/base_dtype.py).

Exactness of the stored layers, gradients through an int8 base against an fp32 model
holding the dequantized weights, byte counts, config rules, composition with the memory
option and the split cut, a short training run, and what is saved or sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import batch_for, tiny_cfg, write_sst2
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F  # noqa: N812
from transformers.pytorch_utils import Conv1D

from cotune.config import MemoryConfig, build_config
from cotune.config.schema import LoraConfig, ModelConfig
from cotune.errors import ConfigError, ModelError
from cotune.memory import apply_memory_option, sparse_op_counts
from cotune.methods import resolve
from cotune.methods.federated.aggregation import weighted_average
from cotune.methods.federated.state import get_state, set_state
from cotune.models import build_classifier
from cotune.models.base_dtype import (
    FrozenEmbedding,
    FrozenLinear,
    apply_base_dtype,
    frozen_linear_count,
    quantize_int8,
    weight_bytes,
)
from cotune.models.causal_lm import build_lm
from cotune.runtime.experiment import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = ("bf16", "int8")


def lora_model(base_dtype: str, family: str = "bert", **lora: object) -> nn.Module:
    cfg = ModelConfig(name=f"tiny-{family}", lora=LoraConfig(**lora), base_dtype=base_dtype)
    model, _, _ = build_classifier(cfg, 3, seed=0)
    return model


def randomize_trainable(model: nn.Module, seed: int = 3) -> None:
    """Non-zero LoRA B (peft starts it at 0, which would zero every A gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def dequantized_twin(model: nn.Module) -> nn.Module:
    """The same LoRA model with an fp32 base whose weights are `model`'s dequantized ones."""
    cfg = ModelConfig(name="tiny-bert", lora=LoraConfig(dropout=0.0))
    twin, _, _ = build_classifier(cfg, 3, seed=0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (FrozenLinear, FrozenEmbedding)):
                twin.get_submodule(name).weight.copy_(m.dequantized_weight())
        twin_params = dict(twin.named_parameters())
        for n, p in model.named_parameters():
            twin_params[n].copy_(p)
    return twin


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("base_dtype", DTYPES)
def test_frozen_linear_forward_is_f_linear_with_the_dequantized_weight(base_dtype: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    frozen = FrozenLinear(lin.weight, lin.bias, base_dtype)  # type: ignore[arg-type]
    w_hat = frozen.dequantized_weight()
    if base_dtype == "bf16":
        assert torch.equal(w_hat, lin.weight.detach().bfloat16().float())
    else:  # absmax int8 per output row: error at most half a step of that row's scale
        _, scale = quantize_int8(lin.weight)
        err = (w_hat - lin.weight.detach()).abs()
        assert bool((err <= scale[:, None] / 2 + 1e-7).all())
        assert err.max() > 0  # it is a real rounding, not the fp32 weight
    x = torch.randn(3, 5, 48)
    expected = F.linear(x, w_hat, lin.bias.detach())
    assert torch.equal(frozen(x), expected)  # no gradient: the plain path
    assert torch.equal(frozen(x.requires_grad_(True)), expected)  # through the Function


@pytest.mark.parametrize("base_dtype", DTYPES)
def test_conv1d_is_stored_as_out_in_and_computes_the_same(base_dtype: str) -> None:
    torch.manual_seed(0)
    conv = Conv1D(40, 48)  # GPT-2: weight [in, out]
    nn.init.normal_(conv.weight, std=0.1)
    model = nn.Sequential(conv)
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    apply_base_dtype(model, base_dtype)  # type: ignore[arg-type]
    frozen = model[0]
    assert isinstance(frozen, FrozenLinear)
    assert frozen.stored_weight.shape == (40, 48)
    x = torch.randn(2, 7, 48)
    assert torch.equal(frozen(x), F.linear(x, frozen.dequantized_weight(), conv.bias))
    torch.testing.assert_close(frozen(x), conv(x), atol=2e-2, rtol=0)  # ~ the fp32 layer


@pytest.mark.parametrize("base_dtype", DTYPES)
def test_input_gradient_of_a_frozen_linear_is_exact(base_dtype: str) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(32, 24)
    frozen = FrozenLinear(lin.weight, lin.bias, base_dtype)  # type: ignore[arg-type]
    x = torch.randn(4, 6, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(4, 6, 24)
    frozen(x).backward(dy)
    F.linear(x_ref, frozen.dequantized_weight(), lin.bias.detach()).backward(dy)
    assert x.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("base_dtype", DTYPES)
def test_only_the_stored_weight_is_saved_for_backward(base_dtype: str) -> None:
    model = lora_model(base_dtype, dropout=0.0)
    randomize_trainable(model)
    model.train()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    # the encoder's frozen layers (the head's frozen original, [3, 64], has the shape of
    # the pooled batch the trainable head saves)
    stored = {
        id(m.stored_weight): m.stored_weight
        for n, m in model.named_modules()
        if isinstance(m, FrozenLinear) and ".encoder." in n
    }
    shapes = {tuple(t.shape) for t in stored.values()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch_for("bert")).loss.backward()
    weight_shaped = [t for t in saved if tuple(t.shape) in shapes and t.dim() == 2]
    assert weight_shaped, "the frozen layers saved nothing: the gradient did not go through them"
    # every [out, in]-shaped saved tensor is a stored bf16 / int8 weight, never an fp32 copy
    assert all(id(t) in stored for t in weight_shaped)
    assert {t.dtype for t in weight_shaped} == {
        {"bf16": torch.bfloat16, "int8": torch.int8}[base_dtype]
    }


# ----------------------------------------------------------------------------- gradients


def test_lora_gradients_through_an_int8_base_equal_the_dequantized_fp32_model() -> None:
    model = lora_model("int8", dropout=0.0)
    randomize_trainable(model)
    twin = dequantized_twin(model)
    model.eval()  # no dropout: both see the same function
    twin.eval()
    batch = batch_for("bert")
    out, ref = model(**batch), twin(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads)
    # layer 0's LoRA gradient went back through every int8 layer above it
    assert any("layer.0." in n and "lora_A" in n for n in grads)
    for n, g in grads.items():
        assert g is not None and ref_grads[n] is not None, n
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)
        assert g.abs().sum() > 0, n


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("base_dtype", DTYPES)
def test_stored_base_bytes_drop_4x_int8_2x_bf16(base_dtype: str) -> None:
    fp32 = lora_model("fp32")
    low = lora_model(base_dtype)
    per_weight = {"bf16": 2, "int8": 1}[base_dtype]
    frozen = [(n, m) for n, m in low.named_modules() if isinstance(m, FrozenLinear)]
    tables = [(n, m) for n, m in low.named_modules() if isinstance(m, FrozenEmbedding)]
    # tiny-bert: Q, K, V, attention output, FFN in / out in 4 layers, and the head's
    # frozen original under peft's modules_to_save wrapper
    assert len(frozen) == 4 * 6 + 1 == frozen_linear_count(low)
    assert len(tables) == 3  # word, position, token type
    saved = 0
    for name, m in frozen + tables:
        ref = fp32.get_submodule(name).weight
        rows, cols = (
            ref.shape if isinstance(m, FrozenEmbedding) else (m.out_features, m.in_features)
        )
        scale_bytes = 4 * rows if base_dtype == "int8" else 0
        assert m.stored_weight.nbytes + (
            0 if m.weight_scale is None else m.weight_scale.nbytes
        ) == (rows * cols * per_weight + scale_bytes)
        saved += ref.nbytes - (rows * cols * per_weight + scale_bytes)
    assert weight_bytes(fp32) - weight_bytes(low) == saved
    base_fp32 = sum(fp32.get_submodule(n).weight.nbytes for n, _ in frozen)
    base_low = sum(m.stored_weight.nbytes for _, m in frozen)
    assert base_fp32 == (4 // per_weight) * base_low  # exactly 4x / 2x for the weights
    trainable = {n: p for n, p in low.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert trainable.keys() == {n for n, p in fp32.named_parameters() if p.requires_grad}


def test_tied_lm_head_and_embeddings_stay_fp32_together() -> None:
    cfg = ModelConfig(name="tiny-llama", lora=LoraConfig(), base_dtype="int8")
    model, _, _ = build_lm(cfg, seed=0)
    head = model.lm.get_output_embeddings()
    embed = model.lm.get_input_embeddings()
    assert type(head) is nn.Linear and type(embed) is nn.Embedding
    assert head.weight is embed.weight and head.weight.dtype == torch.float32
    assert frozen_linear_count(model) > 0
    ids = torch.randint(1000, 2000, (2, 8))
    out = model(ids, torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("base_dtype", ["fp32", "int8"])
def test_a_low_precision_base_releases_the_checkpoints_memory_map(
    tmp_path: Path, base_dtype: str
) -> None:
    # transformers loads safetensors over a memory map that lives while any tensor over
    # it does; pages quantizing read stay resident while it is mapped (a SmolLM2 split
    # device kept 405 MiB of them). A tied table kept it mapped before.
    import gc

    from transformers import AutoModelForCausalLM, LlamaConfig

    from cotune.models.lora import apply_lora

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=True)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    file = (tmp_path / "ckpt" / "model.safetensors").resolve()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert _mapped(file)  # loaded over the map: the test can tell
    lm = apply_base_dtype(apply_lora(lm, LoraConfig(r=4), "llama"), base_dtype)  # type: ignore[arg-type]
    gc.collect()
    assert _mapped(file) is (base_dtype == "fp32")
    head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
    assert head.weight is embed.weight  # still tied
    ids = torch.randint(0, 300, (2, 6))
    assert torch.isfinite(lm(input_ids=ids).logits).all()


# ----------------------------------------------------------------------------- rules


def test_int8_without_lora_is_rejected_naming_the_option_and_the_alternatives() -> None:
    cfg = build_config(
        {"method": "centralized", "model": {"name": "tiny-bert", "base_dtype": "int8"}}
    )
    with pytest.raises(ConfigError) as err:
        resolve(cfg)
    msg = str(err.value)
    assert "model.base_dtype = 'int8'" in msg
    assert "[model.lora]" in msg and "model.base_dtype = 'fp32'" in msg
    # the same with LoRA resolves
    resolve(
        build_config(
            {
                "method": "centralized",
                "model": {"name": "tiny-bert", "base_dtype": "int8", "lora": {}},
            }
        )
    )
    # building without the config check: the model builder refuses too
    with pytest.raises(ModelError, match="model.lora"):
        build_classifier(ModelConfig(name="tiny-bert", base_dtype="int8"), 2)


def test_fedpft_rejects_a_low_precision_base() -> None:
    cfg = build_config({"method": "fedpft", "model": {"name": "tiny-bert", "base_dtype": "bf16"}})
    with pytest.raises(ConfigError, match="fedpft does not support model.base_dtype = 'bf16'"):
        resolve(cfg)


def test_unknown_base_dtype_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.base_dtype"):
        build_config({"model": {"base_dtype": "int4"}})


# ----------------------------------------------------------------------------- composition


def test_memory_option_keeps_sparse_saving_on_lora_and_leaves_the_base() -> None:
    """keep = 1 saves every row: the same gradients as without the option, with the
    frozen int8 layers untouched (they save no activation anyway)."""
    model = lora_model("int8", dropout=0.0)
    randomize_trainable(model)
    twin = lora_model("int8", dropout=0.0)
    randomize_trainable(twin)
    apply_memory_option(model, MemoryConfig(backward="random", keep=1.0, ops=["linear"]))
    counts = sparse_op_counts(model)
    lora_linears = sum(
        1 for n, _ in model.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))
    )
    assert counts["linear"] == lora_linears + 1  # LoRA A/B and the trainable head
    assert frozen_linear_count(model) == 4 * 6 + 1
    assert all(type(m) is FrozenLinear for m in model.modules() if isinstance(m, FrozenLinear))
    batch = batch_for("bert")
    model.eval()  # no dropout; sparse saving still runs with gradients on
    twin.eval()
    model(**batch).loss.backward()
    twin(**batch).loss.backward()
    ref = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-5, atol=1e-7, msg=n)


def test_split_device_segment_holds_the_int8_base_and_sends_only_adapters() -> None:
    from cotune.methods.split import build_split

    cfg = tiny_cfg("bert", model={"lora": {"dropout": 0.0}, "base_dtype": "int8"})
    split, _ = build_split(cfg, 3, "classification")
    assert frozen_linear_count(split.device) == 2 * 6  # layers 0, 1 (cut = 2)
    named = split.named_trainable([split.device])
    assert named and all("lora_" in n for n in named)
    assert all(p.dtype == torch.float32 for p in named.values())


def test_a_splitfed_device_stores_its_token_table_and_only_its_own_layers() -> None:
    # The uncut model ties the token table to the LM head, so it stays fp32 there; the
    # device segment holds the table alone and stores it in int8 like its layers. It
    # converts nothing it drops (the cloud layers), and both sides still agree on every
    # trainable tensor; the cloud keeps its LM head fp32, tied as in the uncut model.
    from cotune.methods.splitfed import build_lm_split

    cfg = tiny_cfg("llama", model={"lora": {"dropout": 0.0}, "base_dtype": "int8"})
    device, *_ = build_lm_split(cfg, party="device")
    cloud, *_ = build_lm_split(cfg)
    tables = [m for m in device.device.modules() if isinstance(m, FrozenEmbedding)]
    assert len(tables) == 1 and tables[0].stored_weight.dtype == torch.int8
    assert not any(type(m) is nn.Embedding for m in device.device.modules())
    assert frozen_linear_count(device.device) == 2 * 7  # layers 0, 1: q k v o gate up down
    assert frozen_linear_count(device.cloud) == 0 and frozen_linear_count(device.head) == 0
    head = cloud.head.lm_head
    embed = next(m for m in cloud.device.modules() if type(m) is nn.Embedding)
    assert type(head) is nn.Linear and head.weight is embed.weight
    assert frozen_linear_count(cloud.cloud) == frozen_linear_count(cloud.device) == 2 * 7
    torch.testing.assert_close(
        tables[0].dequantized_weight(), embed.weight, atol=embed.weight.abs().max() / 254, rtol=0
    )
    ours = device.named_trainable([device.device])
    theirs = cloud.named_trainable([cloud.device])
    assert ours.keys() == theirs.keys() and ours
    for name, p in ours.items():
        torch.testing.assert_close(p, theirs[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("family", "ffn_in"), [("bert", "intermediate.dense"), ("gpt2", "mlp.c_fc")]
)
def test_sft_cut_factorises_the_dequantized_ffn_weight(family: str, ffn_in: str) -> None:
    from cotune.models.cut import cut_classifier

    cfg = ModelConfig(name=f"tiny-{family}", lora=LoraConfig(), base_dtype="int8")
    model, _, _ = build_classifier(cfg, 3, seed=0)
    layer = next(m for n, m in model.named_modules() if n.endswith(f".2.{ffn_in}"))
    assert isinstance(layer, FrozenLinear)
    w_hat = layer.dequantized_weight()  # [d_ff, d] = [128, 64]
    split = cut_classifier(model, 2, sft_rank=64)  # full rank: U diag(S) V == W_hat
    device_half, cloud_half = split.device.sft, split.cloud.sft
    assert device_half is not None and cloud_half is not None
    rebuilt = cloud_half.U @ torch.diag(device_half.S) @ device_half.V
    torch.testing.assert_close(rebuilt, w_hat, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- runs


@pytest.fixture
def sst2(tmp_path: Path) -> Path:
    return write_sst2(tmp_path, n_train=160, n_dev=48)


def test_centralized_int8_lora_learns_and_saves_only_fp32_adapters(
    sst2: Path, tmp_path: Path
) -> None:
    cfg = build_config(
        {
            "name": "int8-base",
            "method": "centralized",
            "seed": 0,
            "task": {"name": "glue/sst2", "data_dir": str(sst2)},
            "model": {"name": "tiny-bert", "lora": {"r": 8}, "base_dtype": "int8"},
            "train": {"batch_size": 16, "max_seq_len": 24, "threads": 1, "steps": 50, "lr": 1e-2},
        }
    )
    run = run_experiment(cfg, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] >= 0.8  # 48 dev sentences, chance is 0.5
    fp32_bytes = weight_bytes(lora_model("fp32", family="bert"))
    assert 0 < summary["device_weight_bytes"] < fp32_bytes / 3
    # train.jsonl: the mean training loss every 10 steps
    losses = [json.loads(line)["loss"] for line in (run / "train.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0]
    saved = load_file(str(run / "trainable.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert all("lora_" in n or ".head." in n for n in saved)
    assert summary["trainable_params"]["device"] == sum(t.numel() for t in saved.values())


def test_federated_state_is_the_fp32_adapters_and_averages() -> None:
    a, b = lora_model("int8"), lora_model("int8")
    randomize_trainable(a, seed=1)
    randomize_trainable(b, seed=2)
    sa, sb = get_state(a), get_state(b)
    assert set(sa) == {n for n, p in a.named_parameters() if p.requires_grad}
    assert all(v.dtype == np.float32 for v in sa.values())
    assert not any("stored_weight" in n or "weight_scale" in n for n in sa)
    # peft's own adapter state (what save_pretrained writes): LoRA and the head, fp32
    from peft import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(a)
    assert peft_state and all(t.dtype == torch.float32 for t in peft_state.values())
    assert all("lora_" in n or "head" in n for n in peft_state)
    avg = weighted_average([sa, sb], [1.0, 3.0])
    set_state(a, avg)
    for n, v in get_state(a).items():
        np.testing.assert_allclose(v, 0.25 * sa[n] + 0.75 * sb[n], rtol=1e-6, atol=1e-7)


def test_fedlora_with_an_int8_base_runs_and_reports_device_weight_bytes(
    sst2: Path, tmp_path: Path
) -> None:
    from helpers import tiny_config

    from cotune.runtime.federated.engine import run_federated

    cfg = tiny_config(sst2, model={"name": "tiny-bert", "lora": {}, "base_dtype": "int8"})
    result = run_federated(cfg, tmp_path / "fed", engine="inline")
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    client, _, _ = build_classifier(cfg.model, 2)  # what each client builds
    assert frozen_linear_count(client) == 4 * 6 + 1
    assert result.extra["device_weight_bytes"] == weight_bytes(client)
    assert (
        weight_bytes(client)
        < weight_bytes(build_classifier(cfg.model.model_copy(update={"base_dtype": "fp32"}), 2)[0])
        / 3
    )


def test_int8_base_under_bf16_autocast_matches_the_dequantized_twin() -> None:
    """train.precision = "bf16": the stored weight is dequantized, then autocast runs the
    matmul in bf16 as it does for the stock layer; the input gradient comes back fp32."""
    model = lora_model("int8", dropout=0.0)
    randomize_trainable(model)
    twin = dequantized_twin(model)
    model.eval()
    twin.eval()
    batch = batch_for("bert")
    for m in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**batch).loss
        loss.backward()
    ref = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, n
            torch.testing.assert_close(p.grad, ref[n].grad, rtol=2e-2, atol=1e-5, msg=n)


def test_a_trainable_bias_of_a_frozen_linear_gets_its_gradient() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(16, 8)
    lin.weight.requires_grad_(False)
    model = nn.Sequential(lin)
    apply_base_dtype(model, "int8")
    frozen = model[0]
    assert isinstance(frozen, FrozenLinear) and frozen.bias is not None
    assert frozen.bias.requires_grad
    x = torch.randn(5, 16)
    dy = torch.randn(5, 8)
    frozen(x).backward(dy)
    assert frozen.bias.grad is not None
    torch.testing.assert_close(frozen.bias.grad, dy.sum(0))


def test_a_loaded_checkpoint_file_is_released_after_quantizing(tmp_path: Path) -> None:
    """transformers maps the checkpoint file; the fp32 tensors left (norms, biases) must
    not keep it mapped, or every page quantizing read stays resident."""
    import gc

    from cotune.models import load_backbone, load_tokenizer

    folder = tmp_path / "tiny-bert-saved"
    load_backbone("tiny-bert", seed=0).save_pretrained(folder)
    load_tokenizer("tiny-bert").save_pretrained(folder)
    weights = str(folder / "model.safetensors")

    def mapped() -> bool:
        gc.collect()
        return weights in Path("/proc/self/maps").read_text()

    fp32, _, _ = build_classifier(ModelConfig(name=str(folder), lora=LoraConfig()), 2)
    assert mapped()  # the control: an fp32 model keeps its checkpoint mapped
    del fp32
    assert not mapped()
    low, _, _ = build_classifier(
        ModelConfig(name=str(folder), lora=LoraConfig(), base_dtype="int8"), 2
    )
    assert frozen_linear_count(low) > 0
    assert not mapped()
