"""A federated client's round: load the global state, train on the client's own
partition for the same number of local steps in every method, hand back the update.

No Flower here: the runtime's ClientApp unpacks the message, calls the method's
`client_train` (this `local_train` for fedavg, fedlora and fedkd), and packs the reply.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from typing import Any

from torch import nn

from cotune.config import Config
from cotune.data import Example
from cotune.data.e2e import group_by_mr
from cotune.data.task import GenerationTask
from cotune.memory import apply_memory_option
from cotune.methods.federated.data import client_examples, client_task
from cotune.methods.federated.state import get_state, set_state
from cotune.methods.spec import ClientEvaluation, ClientUpdate, State
from cotune.training import (
    ModelStep,
    StepStats,
    TaskAdapter,
    adapter_for,
    cycle,
    derive_seed,
    fit,
    make_optimizer,
    round_schedule,
    seed_everything,
    set_threads,
)
from cotune.training.tasks import Encoded


def local_steps(cfg: Config, batches_per_epoch: int) -> int:
    """Optimiser steps per round: `federated.local_steps`, else `local_epochs` epochs."""
    if cfg.federated.local_steps is not None:
        return cfg.federated.local_steps
    return max(1, math.ceil(cfg.federated.local_epochs * batches_per_epoch))


def check_partition(cfg: Config, partition_id: int) -> None:
    if not 0 <= partition_id < cfg.federated.clients:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{cfg.federated.clients - 1} "
            f"(federated.clients = {cfg.federated.clients})"
        )


def client_adapter(cfg: Config) -> TaskAdapter:
    return adapter_for(client_task(cfg), cfg)


@lru_cache(maxsize=4)  # one per device config: a fleet of up to 4 LoRA ranks per process
def _client_model(cfg_json: str) -> tuple[nn.Module, Any]:
    cfg = Config.model_validate_json(cfg_json)
    model, tokenizer = client_adapter(cfg).build_model()
    apply_memory_option(model, cfg.memory)
    return model, tokenizer


def partition_data(cfg: Config, partition_id: int, tokenizer: Any) -> Encoded:
    """The client's own training examples, tokenised."""
    return client_adapter(cfg).encode(client_examples(cfg, partition_id), tokenizer)


@lru_cache(maxsize=4)
def _client_data(cfg_json: str, partition_id: int) -> Encoded:
    cfg = Config.model_validate_json(cfg_json)
    return partition_data(cfg, partition_id, _client_model(cfg_json)[1])


def train_round(
    cfg: Config, model: nn.Module, tokenizer: Any, data: Encoded, partition_id: int,
    server_round: int,
) -> StepStats:  # fmt: skip
    """Train `model` (already holding the global state) on `data` for one round: the
    client's seeded order, `local_steps` steps on the whole budget's LR curve."""
    seed = derive_seed(cfg.seed, "client", server_round, partition_id)
    seed_everything(seed)  # after the build: a cached model must not shift the stream
    loader = client_adapter(cfg).loader(data, tokenizer, shuffle=True, seed=seed)
    n_steps = local_steps(cfg, len(loader))
    optimizer = make_optimizer(model.parameters(), cfg)
    schedule = round_schedule(optimizer, cfg.train, n_steps, cfg.federated.rounds, server_round)
    step = ModelStep(model, optimizer, schedule, precision=cfg.train.precision,
                     max_grad_norm=cfg.train.max_grad_norm)  # fmt: skip
    return fit(step, cycle(loader), n_steps, breakdown_memory=cfg.memory.report)


def round_metrics(stats: StepStats) -> dict[str, float]:
    return {
        "train_loss": stats.mean_loss,
        "steps": float(stats.steps),
        "train_s": stats.train_s,
        "peak_rss_bytes": float(stats.peak_rss_bytes),
        "saved_activation_bytes": float(stats.saved_activation_bytes),
    }


def local_train(
    cfg: Config,
    partition_id: int,
    global_state: State,
    server_round: int,
    extras: dict[str, State] | None = None,
) -> ClientUpdate:
    """Train the global model on partition `partition_id` for one round."""
    check_partition(cfg, partition_id)
    key = cfg.model_dump_json()
    set_threads(cfg.train)
    model, tokenizer = _client_model(key)  # built (drawing random numbers) once per process
    data = _client_data(key, partition_id)
    set_state(model, global_state)
    stats = train_round(cfg, model, tokenizer, data, partition_id, server_round)
    return ClientUpdate(
        state=get_state(model), num_examples=len(data), metrics=round_metrics(stats)
    )


def local_evaluate(cfg: Config, partition_id: int, global_state: State) -> ClientEvaluation:
    """Score the global model on this client's own evaluation examples (the
    runtime points `cfg.task` at them): the client's share of a federated evaluation
    when the server holds no evaluation data."""
    check_partition(cfg, partition_id)
    set_threads(cfg.train)
    model, tokenizer = _client_model(cfg.model_dump_json())
    set_state(model, global_state)
    task = client_task(cfg)
    scored = replace(task, eval={"eval": task.train})
    if isinstance(task, GenerationTask):
        prompts, refs = group_by_mr([(ex.text_a, ex.text_b or "") for ex in task.train])
        scored = replace(
            task,
            eval={"eval": [Example(p, None, 0) for p in prompts]},
            references={"eval": refs},
        )
    evaluation = adapter_for(scored, cfg).evaluate(model, tokenizer)
    return ClientEvaluation(len(scored.eval["eval"]), dict(evaluation.metrics))
