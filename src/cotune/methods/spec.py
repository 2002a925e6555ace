"""What a method declares, and what it hands back to the runtime.

A method is one module (or package) exposing `SPEC`, a `MethodSpec`: its name, the
optional config sections it reads, the rules it checks on a config, and *how it runs*,
one of three shapes the runtime knows how to execute:

- `LocalSpec(train, resumable)`: everything in one process (centralized). `train(cfg,
  recorder, run_dir, resume=False)` trains and scores the model (continuing from the
  run folder's checkpoint with `resume`, when the spec is resumable).
- `SplitSpec(cloud, device, devices, finish)`: one cloud serves `devices(cfg)` devices
  over a link. `cloud(cfg)` is the link service (`cotune cloud` serves it); `device(cfg,
  device_id, connect, recorder, run_dir)` trains one device to the end through the
  transport `connect()` returns; `finish(cfg, cloud, devices, recorder, run_dir)` turns
  the outcomes into the run's result (e.g. merge and score).
- `FederatedSpec(client_train, server_hook, resumable, public_fraction,
  client_evaluate)`: rounds on Flower. `client_train(cfg, partition, global_state,
  round, extras)` is one client's round; `server_hook(cfg, global_model)` is the
  server's work around each aggregation (what each client receives, how updates
  combine, what happens after); `client_evaluate(cfg, partition, state)` scores the
  global model on a client's own data (when the server has none).

The runtime owns processes, sockets, threads, engines, resume and the run folder; a
method never starts a process or opens a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch

from cotune.config import Config
from cotune.link.service import Service
from cotune.link.transport import Transport
from cotune.training.loop import Recorder

if TYPE_CHECKING:
    from cotune.methods.federated.global_model import GlobalModel

State = dict[str, np.ndarray]  # a model's trainable tensors by name, as they travel
TransportFactory = Callable[[], Transport]


class NullRecorder:
    """A recorder that keeps nothing (tests, and runs whose folder is elsewhere)."""

    def log_eval(self, record: dict[str, Any]) -> None:
        pass

    def log_train(self, record: dict[str, Any]) -> None:
        pass


@dataclass
class MethodResult:
    """What a run (or one device of it) did; the runtime writes it as summary.json,
    saves each entry of `saved` as a safetensors file in the run folder, and writes
    `predictions` (one record per eval example of the final evaluation, the task
    adapter's `Evaluation.predictions`) as predictions.jsonl."""

    metrics: dict[str, float]
    bytes_up: int = 0
    bytes_down: int = 0
    device_peak_bytes: int | None = None
    saved_activation_bytes: int | None = None
    trainable_device: int = 0
    trainable_cloud: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> MethodResult:
        """Back from a run folder's summary.json (a device process's, for example)."""
        known = {"method", "task", "model", "metrics", "comm", "wall_s", "projected_wall_s",
                 "device_peak_bytes",
                 "trainable_params", "saved_activation_bytes", "seed", "name"}  # fmt: skip
        return cls(
            metrics=dict(summary["metrics"]),
            bytes_up=int(summary["comm"]["bytes_up"]),
            bytes_down=int(summary["comm"]["bytes_down"]),
            device_peak_bytes=summary.get("device_peak_bytes"),
            saved_activation_bytes=summary.get("saved_activation_bytes"),
            trainable_device=int(summary["trainable_params"]["device"]),
            trainable_cloud=int(summary["trainable_params"]["cloud"]),
            extra={k: v for k, v in summary.items() if k not in known},
        )


# ----------------------------------------------------------------------------- local


@dataclass(frozen=True)
class LocalSpec:
    """`train(cfg, recorder, run_dir, resume=False)`; with `resumable`, `resume=True`
    continues from the run folder's checkpoint (`cotune.training.resume`)."""

    train: Callable[..., MethodResult]
    resumable: bool = False


# ----------------------------------------------------------------------------- split


class CloudService(Service, Protocol):
    """A split cloud: a link service that can also say what it trained."""

    @property
    def steps(self) -> int:
        """Optimiser steps taken (all devices)."""
        ...

    def trainable_count(self) -> int: ...

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The cloud's trainable tensors under the uncut model's names."""
        ...


@dataclass
class CloudOutcome:
    """What the cloud of a finished split run holds (read from the service in
    simulation, from `cotune cloud`'s output folder over gRPC)."""

    state: dict[str, torch.Tensor]
    steps: int
    trainable: int


@dataclass
class DeviceOutcome:
    """One finished device of a split run: its result and its trained tensors."""

    device_id: int
    result: MethodResult
    state: dict[str, torch.Tensor]


def only_device(
    cfg: Config,
    cloud: CloudOutcome,
    devices: list[DeviceOutcome],
    recorder: Recorder,
    run_dir: Path | None,
) -> MethodResult:
    """`finish` of a one-device run: the device's own result is the run's."""
    return devices[0].result


@dataclass(frozen=True)
class SplitSpec:
    cloud: Callable[[Config], CloudService]
    device: Callable[[Config, int, TransportFactory, Recorder, Path | None], MethodResult]
    devices: Callable[[Config], int] = lambda cfg: 1
    finish: Callable[
        [Config, CloudOutcome, list[DeviceOutcome], Recorder, Path | None], MethodResult
    ] = only_device
    # the file each device saves its trained tensors in (its `MethodResult.saved` key)
    device_file: str = "device_trainable.safetensors"


# ----------------------------------------------------------------------------- federated


@dataclass
class ClientUpdate:
    """What one client reports after a round; `extras` travel as further ArrayRecords
    (e.g. fedpft's neuron statistics)."""

    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, State] = field(default_factory=dict)


@dataclass
class ClientEvaluation:
    """A client's score of the global model on its own data, and how many examples."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class AcceptedUpdate(NamedTuple):
    """A client update that passed the checks, as the server aggregates it."""

    partition: int
    state: State
    weight: float  # the client's examples


class ServerHook:
    """Server-side work of a federated method around aggregation. Every hook has a
    default that does nothing, so a method overrides only what it needs."""

    @property
    def trainable(self) -> int:
        """Parameters the hook trains on the server (cloud side)."""
        return 0

    def after_aggregate(self, server_round: int, state: State) -> State:
        """Turn the aggregated state into the state sent back to clients."""
        return state

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round metrics to log (e.g. the teacher's accuracy)."""
        return {}

    def device_model(self) -> torch.nn.Module | None:
        """The model a client holds, when it is not the global model (fedpft's proxy)."""
        return None

    def state_dict(self) -> State:
        """What must be checkpointed to continue after this round."""
        return {}

    def load_state_dict(self, state: State) -> None:
        pass

    def state_for(self, partition: int, server_round: int, state: State) -> State:
        """The global `state` as client `partition` receives it this round (default: as
        is; fedlora with per-device ranks cuts it to the device's rank). The client's
        update must have the names and shapes of what it received."""
        return state

    def aggregate(
        self, server_round: int, updates: Sequence[AcceptedUpdate], global_state: State
    ) -> State | None:
        """The new global state from the accepted updates (in partition order) and the
        round's global state; None (the default): the runtime's example-weighted average
        of updates shaped like `global_state` (`aggregation.weighted_average`)."""
        return None

    def extras_for(self, partition: int, server_round: int) -> dict[str, State]:
        """Extra ArrayRecords for one client's train message (counted with the round)."""
        return {}

    def observe_reply(
        self,
        server_round: int,
        partition: int,
        extras: dict[str, State],
        weight: float,
        accepted: bool,
    ) -> None:
        """A client's reply arrived (its extra ArrayRecords, its weight, whether its
        update was aggregated)."""


def no_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    return ServerHook()


ClientTrain = Callable[[Config, int, State, int, dict[str, State]], ClientUpdate]
ClientEvaluate = Callable[[Config, int, State], ClientEvaluation]


@dataclass(frozen=True)
class FederatedSpec:
    client_train: ClientTrain
    server_hook: Callable[[Config, GlobalModel], ServerHook] = no_hook
    resumable: bool = True
    # share of the training data the server keeps as public data (fedkd's teacher data)
    public_fraction: Callable[[Config], float] = lambda cfg: 0.0
    # `client_evaluate(cfg, partition, global_state)`: score the global model on the
    # client's own data, when the clients bring their data and the server has no
    # evaluation set (None: the method needs the server's evaluation set then)
    client_evaluate: ClientEvaluate | None = None
    # whether devices may train adapters of different LoRA ranks (federated.client_ranks,
    # or ranks in federated.devices): fedlora's rank-aware aggregation
    device_ranks: bool = False
    # whether the rounds may be run with user-level differential privacy
    # (`privacy.federated`): the update a client sends is its whole contribution, and
    # what the server does after averaging is post-processing
    differential_privacy: bool = False
    # whether the rounds may use SecAgg+ (`federated.secagg`): the server needs only the
    # example-weighted sum of the updates, nothing of any single one
    secure_aggregation: bool = False


# ----------------------------------------------------------------------------- the spec


def no_rules(cfg: Config) -> None:
    pass


def reject_task_kind(cfg: Config, kinds: tuple[str, ...], alternatives: str) -> None:
    """A `ConfigError` when `cfg.task` is of one of `kinds`, which `cfg.method` cannot
    train; an unknown task name is left for `load_task` to report."""
    from cotune.data.registry import task_kind
    from cotune.errors import ConfigError

    try:
        kind = task_kind(cfg.task.name, cfg.task)
    except ConfigError:
        return
    if kind in kinds:
        raise ConfigError(
            f"{cfg.method} does not support task kind {kind} yet (task {cfg.task.name!r}); "
            f"use {alternatives}"
        )


def require_model_family(cfg: Config, families: tuple[str, ...], what: str) -> None:
    """A `ModelError` naming `families` unless `cfg.model` is of one of them: methods
    that cut the model or build a proxy of it need a family whose layout cotune knows
    (a generic encoder or decoder trains only whole). A model name that does not resolve
    is left for the model build to report."""
    from cotune.errors import ModelError
    from cotune.models.zoo import require_family
    from cotune.models.zoo import resolve as resolve_model

    try:
        source = resolve_model(cfg.model.name, prepare=False)
    except ModelError:
        return
    require_family(source, families, what)


@dataclass(frozen=True)
class MethodSpec:
    """A method: `name`, a one-line `summary`, how it `runs`, the optional config
    sections it `reads`, and `configure(cfg)`, which checks the method's rules on a
    config (raising `ConfigError`) and fills method-specific defaults."""

    name: str
    summary: str
    runs: LocalSpec | SplitSpec | FederatedSpec
    reads: frozenset[str] = frozenset()
    configure: Callable[[Config], None] = no_rules

    @property
    def kind(self) -> str:
        return {LocalSpec: "local", SplitSpec: "split", FederatedSpec: "federated"}[type(self.runs)]
