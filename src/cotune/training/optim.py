"""Optimiser and learning-rate schedule, the same for every side of every method."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from cotune.config import Config, TrainConfig


def make_optimizer(
    params: Iterable[nn.Parameter], cfg: Config, lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW (no weight decay on biases and norms) or SGD over the trainable params.

    AdamW is torch's fused kernel when every parameter is a floating-point CPU tensor:
    one pass per tensor without temporaries, where the default per-tensor loop allocates
    two scratch copies of each parameter (90 MiB for minilm's word embeddings) and is
    about 8x slower on CPU (measured in docs/memory.md). Elsewhere torch's default."""
    lr = cfg.resolved_lr() if lr is None else lr
    params = [p for p in params if p.requires_grad]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = bool(params) and all(p.device.type == "cpu" and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999),
                             fused=fused or None)  # fmt: skip


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base LR after `step` optimiser steps (linear warmup, then decay)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    remaining = max(total - warmup, 1)
    return max(0.0, (total - step) / remaining)


def make_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, train: TrainConfig, offset: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then linear decay (or constant),
    entered `offset` steps in.

    Every side of a split or federated method builds its own schedule with this, so
    device and cloud optimisers follow the same LR curve; a federated client enters the
    curve of the whole budget at its round's offset.
    """
    warmup = math.ceil(train.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s + offset, total_steps, warmup, train.schedule)
    )


def round_schedule(
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    steps_per_round: int,
    rounds: int,
    server_round: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR curve of a whole federated budget (warmup, then decay over all rounds),
    entered at this round's offset, so round r continues where round r - 1 stopped."""
    total = steps_per_round * rounds
    return make_schedule(optimizer, total, train, offset=steps_per_round * (server_round - 1))


def total_steps(train: TrainConfig, batches_per_epoch: int) -> int:
    if train.steps is not None:
        return train.steps
    epochs = train.epochs if train.epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch))
