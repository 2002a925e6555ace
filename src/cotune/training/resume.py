"""Resumable local training: what a run in one process (`centralized`) needs to continue
exactly where it stopped, saved atomically to RUN_DIR/checkpoint.

The checkpoint holds the steps done, the trainable tensors, the optimiser's and the
schedule's state, torch's random state (dropout) and the running totals of `StepStats`.
The data order needs nothing: the loader is seeded by the run's seed and a resumed run
skips the batches already trained on, so step k + 1 sees the batch it would have seen.
`tests/test_resume_local.py` checks that a run stopped and resumed ends with the weights
and metrics of an uninterrupted one.

Saving every `runtime.checkpoint_minutes` (0: after every step) bounds both the work a
crash loses and the time spent saving; the checkpoint is removed when the run ends.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.errors import UserError
from cotune.training.loop import StepStats

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
TENSORS_FILE = "local.pt"
# the StepStats fields a resumed run carries on (the peak figures too: the summary is
# the whole run's)
TOTALS = ("steps", "examples", "tokens", "loss_sum", "train_s", "peak_rss_bytes",
          "saved_activation_bytes", "losses", "step_times")  # fmt: skip


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def write_checkpoint_dir(run_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """RUN_DIR/checkpoint, written by `write(folder)` into a fresh folder that replaces
    the previous checkpoint only once complete (a crash mid-write leaves the previous
    one, or `checkpoint.old` mid-swap, which `state_file` reads). Federated and local
    checkpoints both go through it."""
    final = checkpoint_dir(run_dir)
    tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
    old = final.with_name(CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def state_file(run_dir: str | Path) -> Path | None:
    """The last complete checkpoint's state.json (the previous one when a swap was
    interrupted), or None."""
    path = checkpoint_dir(run_dir) / STATE_FILE
    if path.exists():
        return path
    old = checkpoint_dir(run_dir).with_name(CHECKPOINT_DIR + ".old") / STATE_FILE
    return old if old.exists() else None


def checkpoint_step(run_dir: str | Path) -> int | None:
    """The steps a local run's checkpoint holds (read from its index), or None."""
    state = state_file(run_dir)
    if state is None:
        return None
    meta = json.loads(state.read_text())
    return int(meta["step"]) if meta.get("kind") == "local" else None


@dataclass
class LocalCheckpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    rng: torch.Tensor
    totals: dict[str, Any] = field(default_factory=dict)
    since_eval: list[float] = field(default_factory=list)


def save_local(run_dir: str | Path, ckpt: LocalCheckpoint) -> Path:
    """Write `ckpt`, replacing the previous one only once the new one is complete."""

    def write(folder: Path) -> None:
        torch.save(
            {"trainable": ckpt.trainable, "optimizer": ckpt.optimizer,
             "schedule": ckpt.schedule, "rng": ckpt.rng},
            folder / TENSORS_FILE,
        )  # fmt: skip
        meta = {"kind": "local", "step": ckpt.step, "totals": ckpt.totals,
                "since_eval": ckpt.since_eval}  # fmt: skip
        (folder / STATE_FILE).write_text(json.dumps(meta) + "\n")

    return write_checkpoint_dir(run_dir, write)


def load_local(run_dir: str | Path) -> LocalCheckpoint | None:
    """The run folder's local checkpoint, or None if it has none."""
    state = state_file(run_dir)
    if state is None:
        return None
    meta = json.loads(state.read_text())
    if meta.get("kind") != "local":
        return None
    tensors = torch.load(state.parent / TENSORS_FILE, weights_only=True)
    return LocalCheckpoint(
        step=int(meta["step"]), trainable=tensors["trainable"], optimizer=tensors["optimizer"],
        schedule=tensors["schedule"], rng=tensors["rng"], totals=dict(meta["totals"]),
        since_eval=list(meta.get("since_eval", [])),
    )  # fmt: skip


def remove_local(run_dir: str | Path) -> None:
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)


class LocalResume:
    """Saves a local run's checkpoints as it trains, and restores one.

    `restore()` (before training) loads the trainable tensors, optimiser and schedule
    state into the live objects and returns the `StepStats` to continue from (None when
    there is no checkpoint: the run starts at step 0); `skip(batches, n)` fast-forwards
    the data; `restore_rng()` puts torch's random state back, last (building and
    skipping may draw from it). `maybe_save(step, stats, since_eval)` saves when
    `every_s` seconds have passed since the last save (0: every step)."""

    def __init__(
        self,
        run_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        every_s: float,
    ) -> None:
        self.run_dir = run_dir
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.every_s = every_s
        self.last_save = time.monotonic()
        self._rng: torch.Tensor | None = None
        self.since_eval: list[float] = []

    def restore(self) -> StepStats | None:
        ckpt = load_local(self.run_dir)
        if ckpt is None:
            return None
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(params) != set(ckpt.trainable):
            raise UserError(
                f"the checkpoint in {checkpoint_dir(self.run_dir)} holds other trainable "
                "tensors than this config's model; resume it with the config.toml it was "
                "started with"
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ckpt.trainable[name])
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.schedule.load_state_dict(ckpt.schedule)
        self._rng = ckpt.rng
        self.since_eval = ckpt.since_eval
        stats = StepStats()
        for key in TOTALS:
            if key in ckpt.totals:
                setattr(stats, key, ckpt.totals[key])
        return stats

    @staticmethod
    def skip(batches: Iterator[Any], n: int) -> None:
        for _ in range(n):
            next(batches)

    def restore_rng(self) -> None:
        if self._rng is not None:
            torch.set_rng_state(self._rng)

    def maybe_save(self, step: int, stats: StepStats, since_eval: list[float]) -> bool:
        if time.monotonic() - self.last_save < self.every_s:
            return False
        # the live tensors (no copies: saving is synchronous and nothing trains meanwhile)
        trainable = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        save_local(
            self.run_dir,
            LocalCheckpoint(
                step=step, trainable=trainable, optimizer=self.optimizer.state_dict(),
                schedule=self.schedule.state_dict(), rng=torch.get_rng_state(),
                totals={k: getattr(stats, k) for k in TOTALS}, since_eval=list(since_eval),
            ),
        )  # fmt: skip
        self.last_save = time.monotonic()
        return True
