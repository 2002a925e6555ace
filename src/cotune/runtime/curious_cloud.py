"""An honest-but-curious cloud, watched: run a real in-process split run and keep what
its cloud receives that an attack can use (`cotune.attack.label_leak`): for a
U-shaped run (`split.labels = "device"`), the gradient it decodes from every
`backward` message, with the batch's labels (recorded on the device, for scoring)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cotune.attack.label_leak import LABELS_CROSS, label_leak_report
from cotune.config import Config
from cotune.errors import ConfigError
from cotune.methods import resolve
from cotune.methods.split.cloud import SplitSession
from cotune.methods.split.device import SplitDevice
from cotune.runtime.experiment import run_experiment


@contextlib.contextmanager
def capture_u_shape() -> Iterator[dict[str, list[torch.Tensor]]]:
    """While open, every in-process U-shaped split step records the gradient its cloud
    decodes from the `backward` message (`grads`, [B, H] per step) and the batch's
    labels (`labels`, on the device: for scoring only)."""
    seen: dict[str, list[torch.Tensor]] = {"grads": [], "labels": []}
    backward = SplitSession._backward
    train_step = SplitDevice.train_step

    def watched_backward(self: SplitSession, back: Any) -> Any:
        pending = self.state.pending
        if pending is not None:
            top = pending["top"]
            seen["grads"].append(
                self.cloud.codec.top_backward.decode(
                    back.grad, "backward.grad", top.shape[0], top.shape[1]
                ).detach().float().clone()
            )  # fmt: skip
        return backward(self, back)

    def watched_step(self: SplitDevice, batch: dict[str, torch.Tensor]) -> float:
        if self.labels_on_device:
            seen["labels"].append(batch["labels"].detach().clone())
        return train_step(self, batch)

    SplitSession._backward = watched_backward  # type: ignore[method-assign]
    SplitDevice.train_step = watched_step  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        SplitSession._backward = backward  # type: ignore[method-assign]
        SplitDevice.train_step = train_step  # type: ignore[method-assign]


def label_leak(cfg: Config, out: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Run `cfg` (method split, a classification task) into `out` and report what its
    cloud learns about the training labels: all of them when `split.labels = "cloud"`;
    with `"device"`, `gradient_label_attack`'s accuracy on every training example the
    run sent, against the majority-label floor."""
    if cfg.method != "split":
        raise ConfigError(f"the label attack reads a split run; this config is {cfg.method!r}")
    if cfg.split.labels == "cloud":
        return dict(LABELS_CROSS)
    if cfg.runtime.transport != "inprocess":
        raise ConfigError("the label attack watches an in-process run (runtime.transport)")
    with capture_u_shape() as seen:
        run_experiment(resolve(cfg), out)
    if not seen["grads"] or len(seen["grads"]) != len(seen["labels"]):
        raise RuntimeError(
            f"captured {len(seen['grads'])} gradients for {len(seen['labels'])} batches"
        )
    report = label_leak_report(torch.cat(seen["grads"]), torch.cat(seen["labels"]), seed=seed)
    report["steps"] = len(seen["grads"])
    return report
