"""A client's local work in one round: load the global state, train on the client's own
partition for the same number of local epochs in every method, hand back the update.

No Flower here: the ClientApp (`cotune.runtime.federated.apps`) unpacks the message,
calls `local_train`, and packs the reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from cotune.config import Config, TrainConfig
from cotune.data import EncodedDataset, encode, make_loader
from cotune.memory import apply_memory_option
from cotune.methods.federated.data import split_for, task_for
from cotune.methods.federated.models import State, build_model, get_state, set_state
from cotune.methods.federated.seeds import derive_seed
from cotune.methods.loop import fit
from cotune.methods.training import (
    cycle,
    lr_factor,
    make_optimizer,
    seed_everything,
    set_threads,
)


@dataclass
class ClientUpdate:
    """What one client reports after a round."""

    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def local_steps(cfg: Config, batches_per_epoch: int) -> int:
    """Optimiser steps per round: `federated.local_steps`, else `local_epochs` epochs."""
    if cfg.federated.local_steps is not None:
        return cfg.federated.local_steps
    return max(1, math.ceil(cfg.federated.local_epochs * batches_per_epoch))


def round_schedule(
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    steps_per_round: int,
    rounds: int,
    server_round: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR curve of the whole federated budget (warmup, then decay over all rounds),
    entered at this round's offset, so round r continues where round r - 1 stopped."""
    total = steps_per_round * rounds
    offset = steps_per_round * (server_round - 1)
    warmup = math.ceil(train.warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s + offset, total, warmup, train.schedule)
    )


@lru_cache(maxsize=2)
def _client_model(cfg_json: str):  # type: ignore[no-untyped-def]
    cfg = Config.model_validate_json(cfg_json)
    model, tokenizer = build_model(cfg)
    apply_memory_option(model, cfg.memory)
    return model, tokenizer


@lru_cache(maxsize=4)
def _client_data(cfg_json: str, partition_id: int) -> EncodedDataset:
    cfg = Config.model_validate_json(cfg_json)
    _, tokenizer = _client_model(cfg_json)
    task = task_for(cfg)
    indices = split_for(cfg).clients[partition_id]
    if task.kind == "generation":
        from cotune.methods.lm import encode_pairs

        return encode_pairs([task.train[i] for i in indices], tokenizer, cfg.train.max_seq_len)
    return encode([task.train[i] for i in indices], tokenizer, cfg.train.max_seq_len)


def check_partition(cfg: Config, partition_id: int) -> None:
    if not 0 <= partition_id < cfg.federated.clients:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{cfg.federated.clients - 1} "
            f"(federated.clients = {cfg.federated.clients})"
        )


def local_train(
    cfg: Config, partition_id: int, global_state: State, server_round: int
) -> ClientUpdate:
    """Train the global model on partition `partition_id` for one round."""
    check_partition(cfg, partition_id)
    key = cfg.model_dump_json()
    set_threads(cfg.train)
    model, tokenizer = _client_model(key)  # built (drawing random numbers) once per process
    data = _client_data(key, partition_id)
    seed = derive_seed(cfg.seed, "client", server_round, partition_id)
    seed_everything(seed)  # after the build: a cached model must not shift the stream
    set_state(model, global_state)
    loader = make_loader(
        data, cfg.train.batch_size, shuffle=True, seed=seed, pad_token_id=tokenizer.pad_token_id
    )
    if task_for(cfg).kind == "generation":
        from cotune.methods.lm import make_lm_loader

        loader = make_lm_loader(data, cfg.train.batch_size, True, seed, tokenizer.pad_token_id)
    n_steps = local_steps(cfg, len(loader))
    optimizer = make_optimizer(model.parameters(), cfg)
    schedule = round_schedule(optimizer, cfg.train, n_steps, cfg.federated.rounds, server_round)
    stats = fit(
        model,
        cycle(loader),
        n_steps,
        optimizer,
        schedule,
        precision=cfg.train.precision,
        max_grad_norm=cfg.train.max_grad_norm,
    )
    return ClientUpdate(
        state=get_state(model),
        num_examples=len(data),
        metrics={
            "train_loss": stats.mean_loss,
            "steps": float(stats.steps),
            "train_s": stats.train_s,
            "peak_rss_bytes": float(stats.peak_rss_bytes),
            "saved_activation_bytes": float(stats.saved_activation_bytes),
        },
    )
