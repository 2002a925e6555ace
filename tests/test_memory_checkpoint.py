"""Activation checkpointing (`memory.checkpoint`, `memory.backward = "checkpoint"`), alone
and with the sparse modes: the layers really are recomputed, the gradients are those of
the same mode without checkpointing, the peak of saved bytes falls and is measured
honestly, and it works on LoRA models and on split device segments."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from helpers import inprocess_pair, tiny_cfg
from pydantic import ValidationError
from torch import nn

from cotune.config import MemoryConfig, ModelConfig, build_config, to_toml
from cotune.errors import ConfigError, ModelError
from cotune.memory import (
    SavedTensorMeter,
    apply_memory_option,
    checkpointed_layers,
    remove_memory_option,
    sparse_op_counts,
)
from cotune.models import build_classifier
from cotune.models.causal_lm import build_lm
from cotune.models.cut import cut_classifier
from cotune.models.cut_lm import cut_causal_lm
from cotune.models.rng import RngStream
from cotune.training import ModelStep, fit, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

Batch = dict[str, torch.Tensor]


def _batch(family: str, b: int = 4, length: int = 64, seed: int = 1) -> Batch:
    """Random tokens with right padding of different lengths (the sparse modes must not
    pick padding rows when a layer is recomputed either)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (b,), generator=g)
    if family == "vit":
        return {"pixel_values": torch.randn(b, 1, 28, 28, generator=g), "labels": labels}
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row in range(1, b):
        mask[row, length - 7 * row :] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@cache
def _built(family: str, lora: bool) -> nn.Module:
    cfg = ModelConfig(name=f"tiny-{family}", lora={"r": 4} if lora else None)
    model, _, _ = build_classifier(cfg, 3, seed=0)
    return model


def _model(family: str, lora: bool = False) -> nn.Module:
    """A fresh copy of the tiny classifier in training mode (dropout on)."""
    return copy.deepcopy(_built(family, lora)).train()


def _mem(backward: str = "none", keep: float = 0.25, **kw: object) -> MemoryConfig:
    return MemoryConfig(backward=backward, keep=keep, **kw)  # type: ignore[arg-type]


class _Calls:
    """Counts forward calls of every transformer layer's children (they run again when
    a checkpointed layer is recomputed)."""

    def __init__(self, model: nn.Module) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.n = 0
        self.forward_calls = 0
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                child = next(iter(layer.children()))
                child.register_forward_hook(self._hook)

    def _hook(self, *args: object) -> None:
        self.n += 1


def _step(model: nn.Module, batch: Batch, seed: int = 7):  # type: ignore[no-untyped-def]
    """Loss, gradients, the meter of one forward/backward (dropout on, same RNG), and how
    many layer-child calls the forward and the backward made."""
    calls = _Calls(model)
    torch.manual_seed(seed)
    meter = SavedTensorMeter(model.parameters())
    with meter:
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
    calls.forward_calls = calls.n
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads, meter, calls


def _assert_same_grads(got: dict, ref: dict, atol_share: float = 1e-7) -> None:
    assert set(got) == set(ref) and ref
    scale = max(float(g.abs().max()) for g in ref.values())
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=atol_share * scale, msg=name)


# ------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("family", ["bert", "distilbert", "llama", "gpt2", "vit"])
def test_checkpoint_alone_recomputes_and_gives_the_same_gradients(family: str) -> None:
    batch = _batch(family)
    ref_loss, ref_grads, ref_meter, ref_calls = _step(_model(family), batch)
    model = _model(family)
    apply_memory_option(model, _mem("checkpoint"))
    assert checkpointed_layers(model) == 4
    loss, grads, meter, calls = _step(model, batch)
    # every layer ran twice: once forward, once recomputed in backward
    assert calls.forward_calls == ref_calls.forward_calls == 4
    assert calls.n == 8 and ref_calls.n == 4
    assert torch.equal(loss, ref_loss)
    _assert_same_grads(grads, ref_grads)  # dropout on: torch replays the RNG
    assert meter.bytes < ref_meter.bytes / 4  # only the layers' inputs stay after forward
    assert meter.recompute_bytes > 0 and meter.peak_bytes > meter.bytes


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("mode", ["random", "norm", "backrazor"])
def test_checkpoint_with_a_sparse_mode_gives_that_modes_gradients(family: str, mode: str) -> None:
    """96 tokens: the attention matrices (4 x 96 x 96 per sample) take backrazor's
    sampled-threshold path, whose kept count depends on the draw; the recomputation
    replays the draw (and the padding mask), so the saves match the forward's."""
    batch = _batch(family, length=96)
    ref = _model(family)
    apply_memory_option(ref, _mem(mode), seed=3)
    ref_loss, ref_grads, ref_meter, _ = _step(ref, batch)
    model = _model(family)
    apply_memory_option(model, _mem(mode, checkpoint=True), seed=3)
    assert sparse_op_counts(model)["linear"] >= 16 and checkpointed_layers(model) == 4
    loss, grads, meter, calls = _step(model, batch)
    assert calls.n == 2 * calls.forward_calls
    assert torch.equal(loss, ref_loss)
    _assert_same_grads(grads, ref_grads)
    dense_loss, dense_grads, _, _ = _step(_model(family), batch)
    assert any(not torch.allclose(grads[n], dense_grads[n]) for n in dense_grads)  # sparse
    assert meter.peak_bytes < ref_meter.bytes


# ---------------------------------------------------------------------------- memory


def test_peak_saved_bytes_fall_and_count_the_recomputed_layer() -> None:
    """Without checkpointing the peak is everything the forward saved; with it, the
    layers' inputs plus one layer's recomputed saves. The 4 layers are alike, so four
    times one layer's recomputation plus what the forward kept is about the stock total
    (which shows the recomputation is counted, not skipped)."""
    batch = _batch("bert")
    _, _, stock, _ = _step(_model("bert"), batch)
    model = _model("bert")
    apply_memory_option(model, _mem("checkpoint"))
    _, _, ckpt, _ = _step(model, batch)
    assert stock.peak_bytes == stock.bytes
    assert stock.peak_bytes > 3 * ckpt.peak_bytes
    assert 0.85 * stock.bytes < ckpt.bytes + 4 * ckpt.recompute_bytes < 1.05 * stock.bytes
    assert ckpt.peak_bytes >= ckpt.recompute_bytes + 4 * 64 * 64 * 4  # + a layer input

    norm = _model("bert")
    apply_memory_option(norm, _mem("norm", 0.1))
    _, _, sparse, _ = _step(norm, batch)
    both = _model("bert")
    apply_memory_option(both, _mem("norm", 0.1, checkpoint=True))
    _, _, combined, _ = _step(both, batch)
    # each saves less than either alone; the gain over norm alone is small here, as the
    # layer inputs kept at the boundaries are dense (4 of them against 4 sparse layers)
    assert combined.peak_bytes < ckpt.peak_bytes / 3
    assert sparse.peak_bytes > 1.15 * combined.peak_bytes


def test_training_loop_reports_the_peak() -> None:
    """`fit` (what centralized and the federated clients run) reports the peak, which
    includes the recomputed layer, not just what the forward pass kept."""
    batch = _batch("bert")
    model = _model("bert")
    apply_memory_option(model, _mem("checkpoint"))
    _, _, meter, _ = _step(model, batch)
    cfg = tiny_cfg("bert")
    step = ModelStep(model, make_optimizer(model.parameters(), cfg), None)
    stats = fit(step, iter([batch]), 1)
    assert stats.saved_activation_bytes == meter.peak_bytes > meter.bytes


# -------------------------------------------------------------- LoRA and split models


def test_lora_model_with_checkpoint_and_norm() -> None:
    batch = _batch("bert")
    ref = _model("bert", lora=True)
    apply_memory_option(ref, _mem("norm"))
    _, ref_grads, _, _ = _step(ref, batch)
    model = _model("bert", lora=True)
    apply_memory_option(model, _mem("norm", checkpoint=True))
    assert checkpointed_layers(model) == 4
    _, grads, meter, calls = _step(model, batch)
    assert calls.n == 2 * calls.forward_calls
    assert any("lora_A" in n for n in grads) and all("lora" in n or "head" in n for n in grads)
    _assert_same_grads(grads, ref_grads)


def _capture(optimizer: torch.optim.Optimizer, named: dict, into: dict) -> None:
    def hook(opt, args, kwargs):  # type: ignore[no-untyped-def]
        for name, p in named.items():
            if p.grad is not None:
                into[name] = p.grad.detach().clone()

    optimizer.register_step_pre_hook(hook)


def _split_step(memory: dict):  # type: ignore[no-untyped-def]
    """One training step of a tiny split run (cut 2), the memory option on the device
    segment as `train_device` applies it; the segment comes from `cut_classifier`."""
    cfg = tiny_cfg("bert", split={"cut": 2}, memory=memory)
    rng = RngStream(0, 0)
    rng.state = torch.Generator().manual_seed(1234).get_state()
    device, cloud, _ = inprocess_pair(cfg, rng=rng)
    apply_memory_option(device.segment, cfg.memory, seed=cfg.seed)
    calls = _Calls(device.segment)
    dev: dict[str, torch.Tensor] = {}
    cld: dict[str, torch.Tensor] = {}
    _capture(device.optimizer, device.named, dev)
    _capture(cloud.optimizer, cloud.named, cld)
    loss = device.train_step(_batch("bert", length=32))
    return loss, dev, cld, device, calls


@pytest.mark.parametrize("mode", ["none", "backrazor"])
def test_split_classifier_device_segment(mode: str) -> None:
    ref_loss, ref_dev, ref_cloud, ref_device, _ = _split_step({"backward": mode})
    loss, dev, cld, device, calls = _split_step({"backward": mode, "checkpoint": True})
    assert checkpointed_layers(device.segment) == 2  # the device's two layers
    assert calls.n == 2 * 2  # each ran forward and again in backward
    assert loss == ref_loss
    _assert_same_grads(dev, ref_dev)
    _assert_same_grads(cld, ref_cloud)
    assert device.saved_bytes < ref_device.saved_bytes


def test_cut_classifier_device_segment_directly() -> None:
    """The layers `cut_classifier` hands the device segment are checkpointed where the
    segment calls them; the cloud's layers are untouched."""
    batch = _batch("bert")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    grads = []
    for checkpoint in (False, True):
        split = cut_classifier(_model("bert"), 3)
        if checkpoint:
            apply_memory_option(split.device, _mem("checkpoint"))
            assert checkpointed_layers(split.device) == 3
            assert checkpointed_layers(split.cloud) == 0
        torch.manual_seed(5)
        hidden, _ = split.device(**inputs)
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        grads.append({n: p.grad for n, p in split.device.named_parameters() if p.grad is not None})
    _assert_same_grads(grads[1], grads[0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lm_split_device_segment(family: str) -> None:
    """The causal-LM split (`cut_causal_lm`, LoRA as splitfed trains it), checkpoint with
    norm on the device segment: the gradients of norm without checkpointing."""
    batch = _batch(family, length=32)
    results = []
    for checkpoint in (False, True):
        model, _, _ = build_lm(ModelConfig(name=f"tiny-{family}", lora={"r": 4}), seed=0)
        split = cut_causal_lm(model, 2)
        split.device.train()
        apply_memory_option(split.device, _mem("norm", checkpoint=checkpoint), seed=0)
        calls = _Calls(split.device)
        torch.manual_seed(5)
        hidden, _ = split.device(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        grads = {n: p.grad for n, p in split.device.named_parameters() if p.grad is not None}
        results.append((hidden.detach(), grads, calls.n))
    (ref_hidden, ref_grads, ref_calls), (hidden, grads, n_calls) = results
    assert ref_calls == 2 and n_calls == 4
    assert torch.equal(hidden, ref_hidden)
    assert any("lora_A" in n for n in grads)
    _assert_same_grads(grads, ref_grads)


# ---------------------------------------------------------------- config and removal


def test_backward_checkpoint_is_shorthand_for_none_plus_checkpoint() -> None:
    mem = MemoryConfig(backward="checkpoint")
    assert (mem.backward, mem.checkpoint) == ("none", True)
    assert MemoryConfig(backward="norm", checkpoint=True).backward == "norm"
    # through the config file / --set path, and written back unambiguously
    cfg = build_config({"memory": {"backward": "checkpoint"}})
    assert (cfg.memory.backward, cfg.memory.checkpoint) == ("none", True)
    assert 'backward = "none"' in to_toml(cfg) and "checkpoint = true" in to_toml(cfg)
    assert build_config({}, ["memory.backward=checkpoint"]).memory.checkpoint is True
    # assignment (configs validate assignments) resolves the same way
    cfg = build_config({})
    cfg.memory.backward = "checkpoint"
    assert (cfg.memory.backward, cfg.memory.checkpoint) == ("none", True)


def test_contradictory_checkpoint_settings_are_rejected() -> None:
    with pytest.raises(ValidationError, match="checkpoint = false turns it off"):
        MemoryConfig(backward="checkpoint", checkpoint=False)
    with pytest.raises(ConfigError, match="checkpoint = false turns it off"):
        build_config({"memory": {"backward": "checkpoint", "checkpoint": False}})


def test_a_module_without_transformer_layers_cannot_be_checkpointed() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ModelError, match="no transformer layer to checkpoint"):
        apply_memory_option(model, _mem("checkpoint"))
    assert not any(k.startswith("_cotune") for m in model.modules() for k in vars(m))


def test_remove_memory_option_undoes_checkpointing() -> None:
    batch = _batch("gpt2")
    ref = _model("gpt2")
    _, ref_grads, stock, _ = _step(ref, batch)
    model = _model("gpt2")
    before = [dict(vars(m)) for m in model.modules()]
    apply_memory_option(model, _mem("backrazor", checkpoint=True))
    apply_memory_option(model, _mem("backrazor", checkpoint=True))  # idempotent
    remove_memory_option(model)
    assert checkpointed_layers(model) == 0
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert [set(vars(m)) for m in model.modules()] == [set(d) for d in before]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    _, grads, meter, calls = _step(model, batch)
    assert calls.n == calls.forward_calls  # nothing recomputed
    assert meter.peak_bytes == meter.bytes == stock.bytes
    _assert_same_grads(grads, ref_grads)


# ------------------------------------------------------------ batch-chunked layers


def _no_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of the model off (modules and the attention's own probabilities),
    so runs that draw their masks in another order can be compared."""
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)
        if isinstance(getattr(m, "p", None), float) and "Dropout" in type(m).__name__:
            m.p = 0.0
    return model


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "vit"])
@pytest.mark.parametrize("mode", ["none", "norm"])
def test_chunked_checkpoint_gives_the_unchunked_gradients(family: str, mode: str) -> None:
    """5 rows in 2 slices (3 + 2), padding in both: every layer runs once per slice
    forward and once per slice in backward, and loss and gradients are the unchunked
    run's up to float rounding (the sparse modes rank rows per sequence)."""
    batch = _batch(family, b=5)
    ref = _no_dropout(_model(family))
    apply_memory_option(ref, _mem(mode, checkpoint=True), seed=3)
    ref_loss, ref_grads, _, ref_calls = _step(ref, batch)
    assert torch.equal(_step(ref, batch, seed=8)[0], ref_loss)  # no randomness left
    model = _no_dropout(_model(family))
    apply_memory_option(model, _mem(mode, checkpoint=True, checkpoint_chunks=2), seed=3)
    loss, grads, meter, calls = _step(model, batch)
    assert ref_calls.forward_calls == 4 and calls.forward_calls == 8
    assert calls.n == 16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    _assert_same_grads(grads, ref_grads)
    assert meter.recompute_bytes > 0


def test_chunks_beyond_the_batch_run_one_row_each() -> None:
    batch = _batch("bert", b=3)
    ref = _no_dropout(_model("bert"))
    apply_memory_option(ref, _mem("checkpoint"))
    _, ref_grads, _, _ = _step(ref, batch)
    model = _no_dropout(_model("bert"))
    apply_memory_option(model, _mem("checkpoint", checkpoint_chunks=8))
    _, grads, _, calls = _step(model, batch)
    assert calls.forward_calls == 4 * 3
    # a weight's gradient is summed over three slices: another float summation order
    _assert_same_grads(grads, ref_grads, atol_share=1e-6)


def test_chunked_checkpoint_with_step_in_backward_steps_each_parameter_once() -> None:
    """The slices' contributions to a weight are summed before its accumulation node
    runs: stepping inside backward gives the plain optimiser's update, not two steps.
    SGD: its update is linear in the gradient (AdamW would amplify the rounding noise of
    gradients that are zero in exact arithmetic, e.g. the key bias's)."""
    batch = _batch("bert", b=4)
    cfg = build_config({"model": {"name": "tiny-bert"},
                        "train": {"optimizer": "sgd", "lr": 0.1, "max_grad_norm": 0}})  # fmt: skip
    plain = _no_dropout(_model("bert"))
    start = copy.deepcopy(plain.state_dict())
    inside = copy.deepcopy(plain)
    opt = make_optimizer(plain.parameters(), cfg)
    for _ in range(2):
        out = plain(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    cfg_in = build_config({"model": {"name": "tiny-bert"},
                           "train": {"optimizer": "sgd", "lr": 0.1, "max_grad_norm": 0},
                           "memory": {"checkpoint": True, "checkpoint_chunks": 2,
                                      "step_in_backward": True}})  # fmt: skip
    apply_memory_option(inside, cfg_in.memory)
    opt_in = make_optimizer(inside.parameters(), cfg_in)
    for _ in range(2):
        out = inside(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
        out.loss.backward()
    moved = 0
    for (name, a), (_, b) in zip(plain.named_parameters(), inside.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(a, start[name]))
        assert b.grad is None
    assert moved > 10
    del opt_in


def test_checkpoint_chunks_need_checkpointing() -> None:
    with pytest.raises(ValidationError, match="checkpointing is off"):
        MemoryConfig(checkpoint_chunks=4)
    with pytest.raises(ValidationError):
        MemoryConfig(checkpoint=True, checkpoint_chunks=0)
    assert MemoryConfig(backward="checkpoint", checkpoint_chunks=4).checkpoint_chunks == 4


def test_outputs_that_are_not_one_row_per_example_cannot_be_joined() -> None:
    from cotune.memory.checkpoint import CheckpointFunction

    layer = nn.Linear(4, 4)
    x = torch.randn(4, 3, 4, requires_grad=True)
    rows = CheckpointFunction(layer, chunks=2)(lambda h: (layer(h), None), x)
    assert rows[0].shape == (4, 3, 4) and rows[1] is None
    with pytest.raises(ModelError, match="checkpoint_chunks = 1"):
        CheckpointFunction(layer, chunks=2)(lambda h: layer(h).sum(), x)
    with pytest.raises(ValueError, match="at least 1"):
        CheckpointFunction(layer, chunks=0)
