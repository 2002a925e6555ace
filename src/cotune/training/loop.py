"""The training loop: a few lines, nanoGPT-style, shared by every method.

`fit` runs optimiser steps through a *step function* (`Step`): `ModelStep` for a whole
model trained in one place (centralized, each federated client), a split device's step
for split and splitfed (its forward goes to the cloud). `fit` measures each step's peak
RSS, shows progress, and calls `on_step` after each step; `Checkpoints` is the common
`on_step` that logs training loss every 10 steps and evaluates every `eval_every`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from cotune.memory.allocator import release_free_memory
from cotune.memory.cap import check_memory_cap
from cotune.memory.measure import (
    HeapSampler,
    MemoryBreakdown,
    PeakRSS,
    SavedTensorMeter,
    breakdown,
    model_state_bytes,
)
from cotune.training.placement import device_of, to_device

PROGRESS_ENV = "COTUNE_PROGRESS"  # "0": no step bars, no evaluation lines (--quiet)


def progress_enabled() -> bool:
    """False when `--quiet` (environment COTUNE_PROGRESS=0, inherited by child
    processes) asked for silence."""
    return os.environ.get(PROGRESS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def autocast(precision: str, device_type: str = "cpu") -> AbstractContextManager[object]:
    """Autocast to bf16 on `device_type` ("cpu" or "cuda") for bf16; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()


T = TypeVar("T")


def cycle(loader: Iterable[T]) -> Iterator[T]:
    """Iterate a loader forever; each pass reshuffles (seeded by the loader's generator)."""
    while True:
        yield from loader


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class StepStats:
    """What a stretch of training did, measured as it ran."""

    steps: int = 0
    examples: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    train_s: float = 0.0
    peak_rss_bytes: int = 0
    saved_activation_bytes: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    memory: MemoryBreakdown | None = None  # the breakdown of the step with the highest peak

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.train_s, 1e-9)

    def recent_loss(self, n: int = 10) -> float:
        last = self.losses[-n:]
        return sum(last) / max(len(last), 1)

    def merge(self, other: StepStats) -> None:
        self.steps += other.steps
        self.examples += other.examples
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        self.train_s += other.train_s
        self.peak_rss_bytes = max(self.peak_rss_bytes, other.peak_rss_bytes)
        self.saved_activation_bytes = max(self.saved_activation_bytes, other.saved_activation_bytes)
        self.losses.extend(other.losses)
        self.step_times.extend(other.step_times)
        if other.memory is not None and (
            self.memory is None or other.memory.peak_rss > self.memory.peak_rss
        ):
            self.memory = other.memory

    def summary(self) -> dict[str, Any]:
        """The figures every method reports in summary.json's extras."""
        return {
            **({"memory_breakdown": self.memory.as_dict()} if self.memory else {}),
            "steps": self.steps,
            "examples_seen": self.examples,
            "tokens_per_s": self.tokens_per_s,
            # the lower median, as torch's (the split device reports the same figure)
            **(
                {"step_s_median": statistics.median_low(self.step_times)} if self.step_times else {}
            ),  # fmt: skip
            "train_s": self.train_s,
            "final_train_loss": self.mean_loss if self.steps else None,
        }


class Step(Protocol):
    """One optimiser step on one batch. Returns the loss, or None when no step was
    taken (e.g. a split device's link dropped and it reconnected; the batch is
    skipped). `saved_bytes` is the largest saved-for-backward total of one step so far
    (0 when not measured). A step may also have `memory_state() -> dict[str, int]`
    (`parameters`, `gradients`, `optimizer_state` bytes: `memory.model_state_bytes`),
    which `fit(..., breakdown_memory=True)` reads."""

    @property
    def saved_bytes(self) -> int: ...

    def __call__(self, batch: dict[str, torch.Tensor]) -> float | None: ...


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    precision: str = "fp32",
    max_grad_norm: float | None = None,
    meter: SavedTensorMeter | None = None,
) -> float:
    """One optimiser step on one batch (moved to the model's device); returns the loss."""
    device = device_of(model)
    batch = to_device(batch, device)
    with meter if meter is not None else nullcontext(), autocast(precision, device.type):
        loss = model(**model_inputs(batch), labels=batch["labels"]).loss
    loss.backward()
    if max_grad_norm:  # 0 or None: no clipping
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], max_grad_norm
        )
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


class ModelStep:
    """`train_step` on a whole model; with `measure`, each step's saved-for-backward
    bytes are counted by autograd hooks (parameters excluded)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler | None,
        *,
        precision: str = "fp32",
        max_grad_norm: float | None = None,
        measure: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.measure = measure
        self.params = list(model.parameters())
        self.saved_bytes = 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        self.model.train()
        meter = SavedTensorMeter(self.params) if self.measure else None
        loss = train_step(
            self.model, batch, self.optimizer, self.schedule,
            precision=self.precision, max_grad_norm=self.max_grad_norm, meter=meter,
        )  # fmt: skip
        if meter is not None:
            self.saved_bytes = max(self.saved_bytes, meter.peak_bytes)
        return loss

    def memory_state(self) -> dict[str, int]:
        return model_state_bytes([self.model], self.optimizer)


OnStep = Callable[[int, float, StepStats], None]


def fit(
    step: Step,
    batches: Iterator[dict[str, torch.Tensor]],
    n_steps: int,
    *,
    position: Callable[[], int] | None = None,
    measure: bool = True,
    breakdown_memory: bool = False,
    on_step: OnStep | None = None,
    progress: str | None = None,
    stats: StepStats | None = None,
) -> StepStats:
    """Run `step` over `batches` until `n_steps` optimiser steps are done.

    `position()` says how many steps are done (default: the steps this call took); a
    split device counts a step the cloud finished before a reconnect as done. With
    `measure`, the peak RSS during each step is recorded; with `breakdown_memory` too,
    where it goes (`stats.memory`: a `MemoryBreakdown` of the step with the highest
    peak; parameters, gradients and optimizer state from the step's `memory_state()`
    when it has one). `on_step(step, loss, stats)` runs after each step (evaluation,
    logging), outside the timed region. `stats`: the totals to continue from (a
    resumed run: its steps count as done).
    """
    stats = stats if stats is not None else StepStats()
    done = position or (lambda: stats.steps)
    if measure:  # the setup's garbage (tokenising, loading) goes back to the OS first
        release_free_memory()
    bar = tqdm(
        total=n_steps, initial=done(), desc=progress, unit="step",
        disable=None if progress and progress_enabled() else True, leave=True,
    )  # fmt: skip
    while done() < n_steps:
        batch = next(batches)
        state_of = getattr(step, "memory_state", None)
        state = state_of() if measure and breakdown_memory and state_of is not None else None
        params = getattr(step, "params", ())
        sampler = HeapSampler(params) if measure and breakdown_memory else None
        t0 = time.perf_counter()
        with PeakRSS() if measure else nullcontext() as peak, sampler or nullcontext():
            loss = step(batch)
        dt = time.perf_counter() - t0
        if loss is None:
            bar.update(done() - bar.n)
            continue
        if peak is not None:
            if sampler is not None and peak.peak_bytes >= stats.peak_rss_bytes:
                zero = {"parameters": 0, "gradients": 0, "optimizer_state": 0}
                stats.memory = breakdown(peak.peak_bytes, sampler, state or zero) or stats.memory
            stats.peak_rss_bytes = max(stats.peak_rss_bytes, peak.peak_bytes)
            check_memory_cap(peak.peak_bytes)
        stats.saved_activation_bytes = max(stats.saved_activation_bytes, step.saved_bytes)
        stats.steps += 1
        stats.examples += int(batch["labels"].shape[0])
        stats.tokens += count_tokens(batch)
        stats.loss_sum += loss
        stats.train_s += dt
        stats.losses.append(loss)
        stats.step_times.append(dt)
        bar.update(done() - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{stats.tokens_per_s:,.0f}")
        if on_step is not None:
            on_step(done(), loss, stats)
    bar.close()
    return stats


class Recorder(Protocol):
    """Where a method reports progress; the runtime backs it with a run folder."""

    def log_eval(self, record: dict[str, Any]) -> None: ...

    def log_train(self, record: dict[str, Any]) -> None: ...


class Checkpoints:
    """The usual `on_step`: the training loss every 10 steps, an evaluation every
    `eval_every` steps and after the last one, both written to `recorder`.

    `evaluate()` returns the metrics (with `loss` when it has one); `lr()` the current
    learning rate; `traffic()` the cumulative (bytes_up, bytes_down) so far;
    `network()` the seconds an emulated network adds to the measured time so far
    (`projected_wall_s` = `wall_s` + network(); see `cotune.link.emulation`).
    """

    def __init__(
        self,
        recorder: Recorder,
        n_steps: int,
        eval_every: int | None,
        evaluate: Callable[[], dict[str, float]],
        lr: Callable[[], float],
        traffic: Callable[[], tuple[int, int]] = lambda: (0, 0),
        network: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.recorder = recorder
        self.n_steps = n_steps
        self.eval_every = eval_every or max(n_steps, 1)
        self.evaluate = evaluate
        self.lr = lr
        self.traffic = traffic
        self.network = network
        self.t_start = time.perf_counter()
        self.since_eval: list[float] = []
        self.last: dict[str, float] = {}

    def __call__(self, step: int, loss: float, stats: StepStats) -> None:
        self.since_eval.append(loss)
        logs = step % 10 == 0 or step == self.n_steps
        evals = step % self.eval_every == 0 or step == self.n_steps
        if not (logs or evals):
            return
        up, down = self.traffic()
        if logs:
            self.recorder.log_train(
                {"step": step, "loss": stats.recent_loss(), "lr": self.lr(),
                 "tokens_per_s": stats.tokens_per_s, "bytes_up": up, "bytes_down": down}
            )  # fmt: skip
        if evals:
            self.evaluate_now(step)

    def evaluate_now(self, step: int) -> None:
        """Score the model now and log it as step `step`'s evaluation (with
        `train.steps = 0`, step 0: the model as built)."""
        up, down = self.traffic()
        self.last = dict(self.evaluate())
        wall = time.perf_counter() - self.t_start
        trained = (
            {"train_loss": sum(self.since_eval) / len(self.since_eval)} if self.since_eval else {}
        )
        self.recorder.log_eval(
            {"step": step, **self.last, **trained, "bytes_up": up, "bytes_down": down,
             "wall_s": wall, "projected_wall_s": wall + self.network()}
        )  # fmt: skip
        self.since_eval.clear()
