"""The memory option on whole models of every supported family: the forward pass is the
stock one, gradients at keep = 1 are autograd's, and no dense activation survives."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from torch import nn

from cotune.config import MemoryConfig, ModelConfig
from cotune.errors import ModelError
from cotune.memory import (
    SavedTensorMeter,
    apply_memory_option,
    remove_memory_option,
    sparse_op_counts,
)
from cotune.models import build_classifier, unwrap
from cotune.training import ModelStep, fit

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["bert", "roberta", "distilbert", "llama", "gpt2", "vit"]
MODES = ["random", "norm", "backrazor"]
HIDDEN = 64  # tiny models' width


def _batch(family: str, b: int = 3, length: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (b,), generator=g)
    if family == "vit":
        return {"pixel_values": torch.randn(b, 1, 28, 28, generator=g), "labels": labels}
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row in range(1, b):  # right padding of different lengths
        mask[row, length - 3 * row :] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _tokens(family: str, batch: dict[str, torch.Tensor]) -> int:
    """Token rows per sample the backbone sees."""
    return 50 if family == "vit" else batch["input_ids"].shape[1]  # 7x7 patches + CLS


@cache
def _built(family: str, lora: bool, attn: str | None) -> nn.Module:
    cfg = ModelConfig(name=f"tiny-{family}", lora={"r": 4} if lora else None)
    model, _, _ = build_classifier(cfg, 3, seed=0)
    if attn is not None:
        unwrap(model).backbone.set_attn_implementation(attn)
    return model


def _model(family: str, *, lora: bool = False, attn: str | None = None) -> nn.Module:
    """A fresh copy of the tiny classifier, in training mode (dropout on)."""
    return copy.deepcopy(_built(family, lora, attn)).train()


def _mem(mode: str, keep: float, **kw: object) -> MemoryConfig:
    return MemoryConfig(backward=mode, keep=keep, **kw)  # type: ignore[arg-type]


def _step(model: nn.Module, batch: dict[str, torch.Tensor], seed: int = 7):  # type: ignore[no-untyped-def]
    """Loss, logits and gradients of one training forward/backward (dropout on)."""
    torch.manual_seed(seed)
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_exact_and_keep_one_gives_the_dense_gradients(family: str) -> None:
    """In every mode the forward pass is bit-identical to the eager attention path
    (dropout masks included) and at keep = 1 the gradients are autograd's. Against SDPA,
    the stock default, whose kernel sums in another order: equal within float rounding."""
    batch = _batch(family)
    ref_loss, ref_logits, ref_grads = _step(_model(family, attn="eager"), batch)
    for mode in MODES:
        for keep in (1.0, 0.25):
            model = _model(family, attn="eager")
            apply_memory_option(model, _mem(mode, keep))
            loss, logits, grads = _step(model, batch)
            assert torch.equal(logits, ref_logits), (mode, keep)
            assert torch.equal(loss, ref_loss), (mode, keep)
            if keep == 1.0:
                _assert_same_grads(grads, ref_grads)
    _, sdpa_logits, _ = _step(_model(family), batch)
    model = _model(family)
    apply_memory_option(model, _mem("random", 0.25))
    torch.testing.assert_close(_step(model, batch)[1], sdpa_logits, rtol=1e-5, atol=1e-5)


def _assert_same_grads(got: dict, ref: dict) -> None:
    """Equal up to float rounding; the scale is the model's largest gradient (some, like
    BERT's key biases, are zero in exact arithmetic and pure rounding noise here)."""
    assert set(got) == set(ref)
    scale = max(float(g.abs().max()) for g in ref.values())
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def _saved_storages(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
    return list(saved.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_no_dense_activation_survives(family: str) -> None:
    """At keep = 0.25 every storage autograd keeps is smaller than one dense hidden state
    (B x L x 64 floats), the smallest dense activation: Linear inputs, Q/K/V, attention
    probabilities, LayerNorm and activation inputs, dropout masks all went sparse. Stock
    training keeps many."""
    batch = _batch(family)
    dense_bytes = batch["labels"].shape[0] * _tokens(family, batch) * HIDDEN * 4
    stock = _saved_storages(_model(family), batch)
    assert sum(t.untyped_storage().nbytes() >= dense_bytes for t in stock) >= 8
    for mode in MODES:
        model = _model(family)
        apply_memory_option(model, _mem(mode, 0.25))
        for t in _saved_storages(model, batch):
            nbytes = t.untyped_storage().nbytes()
            assert nbytes < dense_bytes, (mode, tuple(t.shape), t.dtype)


def test_every_family_gets_every_op() -> None:
    for family in FAMILIES:
        model = _model(family)
        apply_memory_option(model, _mem("norm", 0.5))
        counts = sparse_op_counts(model)
        for op in ("linear", "layernorm", "activation", "attention"):
            assert counts.get(op, 0) >= 4, (family, counts)  # 4 layers each


def test_ops_list_limits_what_is_swapped() -> None:
    model = _model("bert")
    apply_memory_option(model, _mem("norm", 0.5, ops=["linear"]))
    counts = sparse_op_counts(model)
    assert counts["linear"] > 0
    assert "layernorm" not in counts and "attention" not in counts


def test_saved_bytes_fall_with_keep() -> None:
    batch = _batch("bert", b=4, length=64)
    measured = {}
    for mode, keep in (("none", 1.0), ("norm", 0.5), ("norm", 0.1)):
        model = _model("bert")
        apply_memory_option(model, _mem(mode, keep))
        with SavedTensorMeter(model.parameters()) as meter:
            model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
        measured[keep] = meter.bytes
    assert measured[1.0] > 2 * measured[0.5] > 0
    assert measured[1.0] > 5 * measured[0.1]


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_runs_the_stock_modules(mode: str) -> None:
    batch = _batch("gpt2")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = _model("gpt2").eval()
    model = _model("gpt2")
    apply_memory_option(model, _mem(mode, 0.1))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)


def test_lora_model() -> None:
    """peft's adapters are swapped too; frozen base layers keep no activation at all."""
    batch = _batch("bert")
    ref_loss, ref_logits, ref = _step(_model("bert", lora=True, attn="eager"), batch)
    model = _model("bert", lora=True, attn="eager")
    apply_memory_option(model, _mem("random", 1.0))
    loss, logits, got = _step(model, batch)
    assert torch.equal(logits, ref_logits)
    assert any("lora_A" in n for n in got)
    _assert_same_grads(got, ref)
    sparse = _model("bert", lora=True)
    apply_memory_option(sparse, _mem("norm", 0.25))
    dense_bytes = 3 * 16 * HIDDEN * 4
    assert all(t.untyped_storage().nbytes() < dense_bytes for t in _saved_storages(sparse, batch))


def test_the_option_can_be_removed() -> None:
    batch = _batch("llama")
    ref = _model("llama")
    with SavedTensorMeter(ref.parameters()) as stock:
        _step(ref, batch)
    model = _model("llama")
    apply_memory_option(model, _mem("norm", 0.1))
    apply_memory_option(model, _mem("random", 0.2))  # re-applying changes the policy
    assert {m._cotune_policy.mode for m in model.modules() if hasattr(m, "_cotune_policy")} == {
        "random"
    }
    remove_memory_option(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert not any(k.startswith("_cotune") for m in model.modules() for k in vars(m))
    with SavedTensorMeter(model.parameters()) as meter:
        _step(model, batch)
    assert meter.bytes == stock.bytes


def test_a_module_without_supported_layers_is_an_error() -> None:
    with pytest.raises(ModelError, match="found no layer"):
        apply_memory_option(nn.Sequential(nn.Conv2d(1, 2, 3)), _mem("norm", 0.5))
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    assert apply_memory_option(model, _mem("none", 0.5)) is model


def test_training_loop_measures_the_saving() -> None:
    """`fit` (what centralized runs) records smaller saved bytes per step with the option."""
    batch = _batch("bert", b=4, length=64)
    stats = {}
    for mode in ("none", "norm"):
        model = _model("bert")
        apply_memory_option(model, _mem(mode, 0.1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        stats[mode] = fit(ModelStep(model, opt, None), iter([batch, batch]), 2)
        assert stats[mode].peak_rss_bytes > 0
    assert stats["none"].saved_activation_bytes > 5 * stats["norm"].saved_activation_bytes > 0


def _padded_batch(family: str) -> dict[str, torch.Tensor]:
    """3 samples of 16 rows with 12, 10 and 6 real tokens."""
    batch = _batch(family)
    mask = torch.zeros(3, 16, dtype=torch.long)
    for row, n in enumerate((12, 10, 6)):
        mask[row, :n] = 1
    batch["attention_mask"] = mask
    batch["input_ids"] = batch["input_ids"] * mask
    return batch


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("mode", ["random", "norm"])
def test_keep_of_real_padding_slots_carry_no_gradient(family: str, mode: str) -> None:
    """keep_of = "real" at keep 0.92 keeps ceil(0.92 n) = n of every sample's real rows
    (n <= 12) and fills the other slots of ceil(0.92 * 16) = 15 with padding rows: the
    gradients are the dense ones, so padding rows add nothing anywhere in the model."""
    batch = _padded_batch(family)
    _, _, ref = _step(_model(family, attn="eager"), batch)
    model = _model(family, attn="eager")
    apply_memory_option(model, _mem(mode, 0.92, keep_of="real"))
    _assert_same_grads(_step(model, batch)[2], ref)


@pytest.mark.parametrize("mode", MODES)
def test_keep_of_real_changes_only_padded_batches(mode: str) -> None:
    """keep 0.5: on a batch without padding "real" and "padded" are the same selection;
    with padding "padded" keeps every real row of the short samples, "real" half."""
    full = _batch("bert")
    full["attention_mask"] = torch.ones_like(full["attention_mask"])
    grads = {}
    for batch_name, batch in (("full", full), ("padded", _padded_batch("bert"))):
        for keep_of in ("padded", "real"):
            model = _model("bert", attn="eager")
            apply_memory_option(model, _mem(mode, 0.5, keep_of=keep_of))
            grads[batch_name, keep_of] = _step(model, batch)[2]
    for name, g in grads["full", "padded"].items():
        assert torch.equal(g, grads["full", "real"][name]), name
    differ = [
        n
        for n, g in grads["padded", "padded"].items()
        if not torch.equal(g, grads["padded", "real"][n])
    ]
    assert len(differ) > 10, differ
