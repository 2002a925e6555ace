"""The server's copy of the global model of a federated run, and its evaluation.

Every round the aggregated (and hooked) state is loaded here and scored on the task's
evaluation splits by the task adapter (classification metrics, or beam search for
generation tasks). When the clients bring their own data the server's task holds its
evaluation data alone (`server_task`), possibly none (`has_eval` false).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cotune.config import Config
from cotune.data import Task
from cotune.methods.federated.data import FederatedSplit, server_task, split_for
from cotune.methods.federated.state import get_state, set_state
from cotune.methods.spec import State
from cotune.training import (
    Evaluation,
    TaskAdapter,
    adapter_for,
    derive_seed,
    seed_everything,
    set_threads,
    trainable_count,
)
from cotune.training.placement import cloud_device, place


class GlobalModel:
    """The global model, its task, the client split and the adapter that scores it."""

    def __init__(self, cfg: Config) -> None:
        set_threads(cfg.train)
        # peft initialises LoRA A from torch's global generator: seed it, so the initial
        # global model (round 1's starting point) is the same in every run.
        seed_everything(derive_seed(cfg.seed, "global-init"))
        self.cfg = cfg
        self.task: Task = server_task(cfg)
        self.adapter: TaskAdapter = adapter_for(self.task, cfg)
        self.split: FederatedSplit = split_for(cfg)
        self.model: nn.Module
        self.tokenizer: Any
        self.model, self.tokenizer = self.adapter.build_model()
        self.device = cloud_device(cfg.runtime.device)  # the server's compute
        place(self.model, self.device)

    @property
    def trainable(self) -> int:
        return trainable_count(self.model)

    @property
    def has_eval(self) -> bool:
        """Whether the server has evaluation examples to score the model on."""
        return any(self.task.eval.values())

    def state(self) -> State:
        return get_state(self.model)

    def load(self, state: State) -> None:
        set_state(self.model, state)

    def evaluate(self) -> dict[str, float]:
        """Task metrics of the current global model on every eval split (with `loss`
        for classifiers)."""
        return self.evaluation().metrics

    def evaluation(self) -> Evaluation:
        """The whole evaluation of the current global model: its metrics, its
        generated texts (generation tasks) and one prediction record per eval example."""
        return self.adapter.evaluate(self.model, self.tokenizer)
