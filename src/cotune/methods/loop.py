"""The training loop: a few lines, nanoGPT-style, shared by every method that trains a
whole model in one place (centralized, and each federated client's local work)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cotune.memory.measure import PeakRSS, SavedTensorMeter
from cotune.methods.training import autocast, count_tokens, model_inputs


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

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def merge(self, other: StepStats) -> None:
        self.steps += other.steps
        self.examples += other.examples
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        self.train_s += other.train_s
        self.peak_rss_bytes = max(self.peak_rss_bytes, other.peak_rss_bytes)
        self.saved_activation_bytes = max(self.saved_activation_bytes, other.saved_activation_bytes)
        self.losses.extend(other.losses)


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
    """One optimiser step on one batch; returns the loss."""
    if meter is not None:
        with meter, autocast(precision):
            loss = model(**model_inputs(batch), labels=batch["labels"]).loss
    else:
        with autocast(precision):
            loss = model(**model_inputs(batch), labels=batch["labels"]).loss
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], max_grad_norm
        )
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def fit(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    n_steps: int,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    precision: str = "fp32",
    max_grad_norm: float | None = None,
    measure: bool = True,
    on_step: Callable[[int, float, StepStats], None] | None = None,
    progress: str | None = None,
    start_step: int = 0,
) -> StepStats:
    """Run `n_steps` optimiser steps over `batches`.

    With `measure`, each step's saved-for-backward bytes (autograd hooks) and the peak
    RSS during the step are recorded. `on_step(step, loss, stats)` runs after each step
    (evaluation, logging), outside the timed region.
    """
    model.train()
    stats = StepStats()
    params = list(model.parameters())
    bar = tqdm(
        total=n_steps, desc=progress, unit="step", disable=None if progress else True, leave=False
    )
    for i in range(n_steps):
        batch = next(batches)
        meter = SavedTensorMeter(params) if measure else None
        t0 = time.perf_counter()
        if measure:
            with PeakRSS() as peak:
                loss = train_step(
                    model, batch, optimizer, schedule,
                    precision=precision, max_grad_norm=max_grad_norm, meter=meter,
                )  # fmt: skip
            stats.peak_rss_bytes = max(stats.peak_rss_bytes, peak.peak_bytes)
            stats.saved_activation_bytes = max(stats.saved_activation_bytes, meter.bytes)
        else:
            loss = train_step(
                model, batch, optimizer, schedule, precision=precision, max_grad_norm=max_grad_norm
            )
        dt = time.perf_counter() - t0
        stats.steps += 1
        stats.examples += int(batch["labels"].shape[0])
        tokens = count_tokens(batch)
        stats.tokens += tokens
        stats.loss_sum += loss
        stats.train_s += dt
        stats.losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{stats.tokens / stats.train_s:,.0f}")
        if on_step is not None:
            on_step(start_step + i + 1, loss, stats)
    bar.close()
    return stats
