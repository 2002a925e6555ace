"""The memory option on the device segment of a split run (what `train_device` applies):
the loss and everything the cloud computes are unchanged, the device's gradients are
autograd's at keep = 1, and the device keeps far fewer bytes for backward."""

from __future__ import annotations

import pytest
import torch
from helpers import batch_for, inprocess_pair, tiny_cfg

from cotune.memory import apply_memory_option, sparse_op_counts
from cotune.models.rng import RngStream

pytestmark = pytest.mark.usefixtures("one_thread")


def _capture(optimizer: torch.optim.Optimizer, named: dict, into: dict) -> None:
    def hook(opt, args, kwargs):  # type: ignore[no-untyped-def]
        for name, p in named.items():
            if p.grad is not None:
                into[name] = p.grad.detach().clone()

    optimizer.register_step_pre_hook(hook)


def _split_step(family: str, memory: dict, labels: str = "cloud"):  # type: ignore[no-untyped-def]
    cfg = tiny_cfg(family, split={"cut": 2, "labels": labels}, memory=memory)
    batch = batch_for(family, b=4, length=24)
    rng = RngStream(0, 0)
    rng.state = torch.Generator().manual_seed(1234).get_state()
    device, cloud, _ = inprocess_pair(cfg, rng=rng)
    apply_memory_option(device.segment, cfg.memory)
    dev_grads: dict[str, torch.Tensor] = {}
    cloud_grads: dict[str, torch.Tensor] = {}
    _capture(device.optimizer, device.named, dev_grads)
    _capture(cloud.optimizer, cloud.named, cloud_grads)
    loss = device.train_step(batch)
    return loss, dev_grads, cloud_grads, device


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("mode", ["random", "norm", "backrazor"])
def test_device_segment_memory_option(family: str, mode: str) -> None:
    ref_loss, ref_dev, ref_cloud, ref_device = _split_step(family, {"backward": "none"})
    assert ref_cloud and ref_dev

    loss, dev, cloud, device = _split_step(family, {"backward": mode, "keep": 0.25})
    counts = sparse_op_counts(device.segment)
    assert counts["linear"] >= 8 and counts["attention"] == 2  # cut = 2 layers on the device
    assert loss == ref_loss  # the forward pass is exact
    assert set(cloud) == set(ref_cloud)
    for name, grad in ref_cloud.items():  # the cloud's side is untouched
        torch.testing.assert_close(cloud[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert set(dev) == set(ref_dev)
    assert any(not torch.allclose(dev[n], ref_dev[n]) for n in ref_dev)  # really sparse
    assert all(torch.isfinite(g).all() for g in dev.values())
    assert 0 < device.saved_bytes < ref_device.saved_bytes / 2.5

    _, dev_one, _, _ = _split_step(family, {"backward": mode, "keep": 1.0})
    scale = max(float(g.abs().max()) for g in ref_dev.values())
    for name, grad in ref_dev.items():
        torch.testing.assert_close(dev_one[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_u_shaped_split_keeps_the_head_dense() -> None:
    """With labels on the device only the segment is swapped; the head stays stock."""
    loss, _, _, device = _split_step("bert", {"backward": "norm", "keep": 0.25}, labels="device")
    ref_loss, _, _, _ = _split_step("bert", {"backward": "none"}, labels="device")
    assert loss == ref_loss
    assert device.head is not None
    assert all(
        type(m).__name__ == type(m).__name__.removeprefix("Sparse") for m in device.head.modules()
    )
