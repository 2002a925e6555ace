"""Pieces every method's training loop shares: optimiser, LR schedule, precision,
evaluation, seeding. A method composes these; none of them knows about transports."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cotune.config import Config, TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(train: TrainConfig) -> None:
    if train.threads is not None:
        torch.set_num_threads(train.threads)


def make_optimizer(
    params: Iterable[nn.Parameter], cfg: Config, lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW (no weight decay on biases and norms) or SGD over the trainable params."""
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
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base LR after `step` optimiser steps (linear warmup, then decay)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    remaining = max(total - warmup, 1)
    return max(0.0, (total - step) / remaining)


def make_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then linear decay (or constant).

    Every side of a split or federated method builds its own schedule with this, so
    device and cloud optimisers follow the same LR curve.
    """
    warmup = math.ceil(train.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, train.schedule)
    )


def autocast(precision: str) -> AbstractContextManager[object]:
    """CPU autocast for bf16; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def total_steps(train: TrainConfig, batches_per_epoch: int) -> int:
    if train.steps is not None:
        return train.steps
    epochs = train.epochs if train.epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch))


def cycle(loader: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate a loader forever; each pass reshuffles (seeded by the loader's generator)."""
    while True:
        yield from loader


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


@dataclass
class EvalResult:
    metrics: dict[str, float]
    loss: float


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: object,
    loaders: dict[str, Iterable[dict[str, torch.Tensor]]],
    precision: str = "fp32",
) -> EvalResult:
    """Evaluate `model` on every eval split of `task`; returns merged metrics and mean loss.

    `model(**inputs, labels=...)` must return an object with `.loss` and `.logits`.
    """
    was_training = model.training
    model.eval()
    merged: dict[str, float] = {}
    loss_sum, n_sum = 0.0, 0
    for split, loader in loaders.items():
        preds, labels = [], []
        for batch in loader:
            with autocast(precision):
                out = model(**model_inputs(batch), labels=batch["labels"])
            logits = out.logits.float()
            n = batch["labels"].shape[0]
            loss_sum += float(out.loss) * n
            n_sum += n
            if task.kind == "regression":  # type: ignore[attr-defined]
                preds.append(logits.squeeze(-1).numpy())
            else:
                preds.append(logits.argmax(-1).numpy())
            labels.append(batch["labels"].numpy())
        merged.update(
            task.compute_metrics(split, np.concatenate(preds), np.concatenate(labels))  # type: ignore[attr-defined]
        )
    model.train(was_training)
    return EvalResult(metrics=merged, loss=loss_sum / max(n_sum, 1))


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
