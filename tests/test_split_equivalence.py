"""With the identity codec, split training computes exactly what the unsplit model does:
the same loss and the same gradient for every parameter (fp32, rtol 1e-5), for every
family and both label placements, for classifier heads and the extractive-QA span head, through the real link (serialized messages, packed
token rows, in-process transport). Dropout is on: with one RNG stream shared by both
sides the split model draws the unsplit model's masks."""

from __future__ import annotations

import pytest
import torch
from helpers import batch_for, inprocess_pair, span_batch_for, tiny_cfg

from cotune.models import build_classifier
from cotune.models.rng import RngStream
from cotune.models.span import build_span_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["bert", "roberta", "distilbert", "llama", "gpt2", "vit", "dinov2"]


def _capture(optimizer: torch.optim.Optimizer, named: dict, into: dict) -> None:
    """Record each parameter's gradient as the optimiser is about to use it."""

    def hook(opt, args, kwargs):  # type: ignore[no-untyped-def]
        for name, p in named.items():
            if p.grad is not None:
                into[name] = p.grad.detach().clone()

    optimizer.register_step_pre_hook(hook)


@pytest.mark.parametrize("labels", ["cloud", "device"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_split_matches_unsplit(family: str, labels: str) -> None:
    cfg = tiny_cfg(family, split={"cut": 2, "labels": labels})
    batch = batch_for(family)
    torch.manual_seed(1234)
    state = torch.get_rng_state()

    reference, _, _ = build_classifier(cfg.model, 3, seed=cfg.seed)
    reference.train()
    torch.set_rng_state(state)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref_loss = reference(**inputs, labels=batch["labels"]).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    rng = RngStream(0, 0)
    rng.state = state.clone()
    device, cloud, _ = inprocess_pair(cfg, rng=rng)
    got: dict[str, torch.Tensor] = {}
    _capture(device.optimizer, device.named, got)
    _capture(cloud.optimizer, cloud.named, got)
    loss = device.train_step(batch)

    torch.testing.assert_close(torch.tensor(loss), ref_loss.detach(), rtol=1e-5, atol=0)
    assert set(got) == set(ref_grads)
    # the device holds the embeddings and layers < cut, the cloud the rest
    assert any("embed" in n or "wte" in n for n in device.named)
    assert not set(device.named) & set(cloud.named)
    assert ("head.weight" in device.named) == (labels == "device")
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-9, msg=name)


TEXT_FAMILIES = ["bert", "roberta", "distilbert", "llama", "gpt2"]


@pytest.mark.parametrize("labels", ["cloud", "device"])
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_identity_split_matches_unsplit_span_head(family: str, labels: str) -> None:
    """Extractive QA: the span head (start/end logits on every token, labels (B, 2)) on
    the cloud, or on the device with every real token's hidden state coming down, gives
    the unsplit SpanExtractor's loss and gradients on a padded batch."""
    cfg = tiny_cfg(family, split={"cut": 2, "labels": labels})
    batch = span_batch_for(family)
    assert not bool(batch["attention_mask"].all())  # padding: its logits must not count
    torch.manual_seed(1234)
    state = torch.get_rng_state()

    reference, _, _ = build_span_model(cfg.model, seed=cfg.seed)
    reference.train()
    torch.set_rng_state(state)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref_loss = reference(**inputs, labels=batch["labels"]).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    rng = RngStream(0, 0)
    rng.state = state.clone()
    device, cloud, _ = inprocess_pair(cfg, rng=rng, problem="span")
    got: dict[str, torch.Tensor] = {}
    _capture(device.optimizer, device.named, got)
    _capture(cloud.optimizer, cloud.named, got)
    loss = device.train_step(batch)

    torch.testing.assert_close(torch.tensor(loss), ref_loss.detach(), rtol=1e-5, atol=0)
    assert set(got) == set(ref_grads)
    assert ("head.weight" in device.named) == (labels == "device")
    assert ("head.weight" in cloud.named) == (labels == "cloud")
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-9, msg=name)


def test_eval_mode_reaches_the_cloud() -> None:
    """Evaluation puts both sides in eval mode (dropout off): repeated evaluations agree,
    and training-mode forwards (dropout on) do not."""
    cfg = tiny_cfg("bert")
    device, cloud, _ = inprocess_pair(cfg)
    batch = batch_for("bert")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    device.eval()
    a = device(labels=batch["labels"], **inputs).logits
    b = device(labels=batch["labels"], **inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not any(m.training for m in cloud.modules)
    device.train()
    c = device(labels=batch["labels"], **inputs).logits
    assert not torch.equal(a, c)
