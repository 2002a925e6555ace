"""The server side of a federated method, without Flower: the global model, its
evaluation on the task's eval split, and the hook a method runs after aggregation.

A hook is where methods differ on the server: fedavg and fedlora have none; fedkd
distils against a teacher (`kd.py`); fedpft can align its proxy the same way. Hooks
carry state across rounds (a teacher's weights), which the runtime checkpoints.
"""

from __future__ import annotations

from typing import Protocol

from cotune.config import Config
from cotune.data import Task
from cotune.methods.centralized import eval_loaders
from cotune.methods.federated.data import FederatedSplit, split_for, task_for
from cotune.methods.federated.models import State, build_model, get_state, set_state
from cotune.methods.federated.seeds import derive_seed
from cotune.methods.training import evaluate, seed_everything, set_threads, trainable_count


class GlobalModel:
    """The server's copy of the global model and the eval loaders it is scored on."""

    def __init__(self, cfg: Config) -> None:
        set_threads(cfg.train)
        # peft initialises LoRA A from torch's global generator: seed it, so the initial
        # global model (round 1's starting point) is the same in every run.
        seed_everything(derive_seed(cfg.seed, "global-init"))
        self.cfg = cfg
        self.task: Task = task_for(cfg)
        self.split: FederatedSplit = split_for(cfg)
        self.model, self.tokenizer = build_model(cfg)
        generation = self.task.kind == "generation"
        self.evals = {} if generation else eval_loaders(self.task, self.tokenizer, cfg)

    @property
    def trainable(self) -> int:
        return trainable_count(self.model)

    def state(self) -> State:
        return get_state(self.model)

    def load(self, state: State) -> None:
        set_state(self.model, state)

    def evaluate(self) -> dict[str, float]:
        """Task metrics of the current global model on every eval split, plus `loss`."""
        if self.task.kind == "generation":  # beam search and the task's metrics
            from cotune.methods.lm import evaluate_generation, generation_model

            lm = generation_model(self.model)
            return evaluate_generation(lm, self.tokenizer, self.task, self.cfg)[0]
        result = evaluate(self.model, self.task, self.evals, self.cfg.train.precision)
        return {**result.metrics, "loss": result.loss}


class ServerHook(Protocol):
    """Server-side work after each aggregation (e.g. distillation, proxy alignment)."""

    def after_aggregate(self, server_round: int, state: State) -> State:
        """Turn the aggregated state into the state sent back to clients."""
        ...

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round metrics to log (e.g. the teacher's accuracy)."""
        ...

    def state_dict(self) -> State:
        """What must be checkpointed to continue after this round."""
        ...

    def load_state_dict(self, state: State) -> None: ...

    @property
    def trainable(self) -> int:
        """Parameters the hook trains on the server (cloud side)."""
        ...


class NoHook:
    """fedavg / fedlora: the aggregate is the new global model."""

    def after_aggregate(self, server_round: int, state: State) -> State:
        return state

    def round_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        pass

    @property
    def trainable(self) -> int:
        return 0
