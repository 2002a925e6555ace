"""The cloud of a splitfed run: a link `Service` serving many devices at once.

- `LMCloud`: `SplitCloud` for a causal LM cut by `cut_causal_lm` (cloud layers, LM
  head and the completion loss; labels are next-token ids, -100 where no loss).
- `split.server = "shared"`: ONE `LMCloud` whose segment every device's batches update
  (SplitFed V2). Its LR schedule spans `clients x steps` optimiser steps, so its LR at
  any time equals the devices' LR (each device takes `steps` steps).
- `split.server = "per_client"`: one `LMCloud` copy per device (SplitFed V1); at every
  averaging round the copies of that round's devices are averaged (weighted like the
  device adapters) and loaded into every copy.
- `Aggregator`: the averaging barrier. Devices send their trainable tensors every
  `federated.aggregate_every` steps (an `Aggregate` message, counted like any other);
  once every connected device of the run has sent round r (or after
  `federated.round_timeout`, default `runtime.timeout_s`), the weighted average goes
  back to each (`Averaged`). A device that disconnects is not waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cotune.config import Config
from cotune.link.errors import MalformedMessage, ProtocolError
from cotune.link.proto import pb
from cotune.link.service import After
from cotune.link.wire import from_wire, to_wire
from cotune.methods.federated.aggregation import check_update, weighted_average
from cotune.methods.split.cloud import SplitCloud, SplitSession
from cotune.methods.split.problems import PerToken, Problem
from cotune.models.cut import Party, store_base
from cotune.training import make_schedule

log = logging.getLogger(__name__)

PROBLEM = "causal_lm"
IGNORE = -100
State = dict[str, np.ndarray]


def build_lm_split(cfg: Config, party: Party = "all") -> tuple[Any, Any, Any, Any]:
    """(split, codec, model, tokenizer): the causal LM of `cfg` built from the seed and cut
    at `split.cut` (the same on every device and on the cloud). The frozen base goes to
    `model.base_dtype` after the cut, in the parts `party` keeps: a device stores its
    token table in it too, which the uncut model ties to the LM head
    (`cotune.models.cut.store_base`)."""
    from cotune.link.codecs import make_codec
    from cotune.models.causal_lm import build_lm
    from cotune.models.cut_lm import cut_causal_lm

    fp32 = cfg.model.model_copy(update={"base_dtype": "fp32"})
    model, tokenizer, _ = build_lm(fp32, seed=cfg.seed, label_smoothing=cfg.train.label_smoothing)
    codec = make_codec(cfg.link)
    split = cut_causal_lm(
        model, cfg.split.cut, label_smoothing=cfg.train.label_smoothing, sft_rank=codec.sft_rank
    )
    store_base(split, cfg.model.base_dtype, party)
    return split, codec, model, tokenizer


class NextTokens(PerToken):
    """Causal LM: next-token ids per position, -100 where there is no loss."""

    name = PROBLEM

    def labels(
        self, wire: pb.Tensor, mask: torch.Tensor | None, batch: int, length: int,
        num_labels: int,
    ) -> torch.Tensor:  # fmt: skip
        labels = from_wire(wire, "forward.labels", dtypes=("int64",), shape=(batch, length))
        bad = (labels != IGNORE) & ((labels < 0) | (labels >= num_labels))
        if bool(bad.any()):
            raise MalformedMessage(f"forward.labels: a token id is outside [0, {num_labels})")
        return labels


class LMCloud(SplitCloud):
    """One cloud model (layers >= cut, LM head, loss) with its optimiser and schedule."""

    PROBLEMS: dict[str, Problem] = {PROBLEM: NextTokens()}

    def __init__(self, cfg: Config, schedule_scale: int = 1) -> None:
        super().__init__(cfg)
        self.schedule_scale = schedule_scale
        self.device_shapes: dict[str, tuple[int, ...]] = {}

    def make_split(self, num_labels: int, problem: str) -> Any:
        split, _, model, _ = build_lm_split(self.cfg)
        vocab = int(model.lm.get_output_embeddings().out_features)  # nn.Linear or FrozenLinear
        if num_labels != vocab:
            raise ProtocolError(f"the device's vocabulary has {num_labels} ids; this model {vocab}")
        self.device_shapes = {
            n: tuple(p.shape) for n, p in split.named_trainable([split.device]).items()
        }
        return split

    def build(self, num_labels: int, problem: str, total_steps: int) -> None:
        super().build(num_labels, problem, total_steps)
        if self.schedule_scale > 1:  # shared: every device's step is a cloud step
            assert self.optimizer is not None
            self.schedule = make_schedule(
                self.optimizer, total_steps * self.schedule_scale, self.cfg.train
            )

    def load_trainable(self, state: State) -> None:
        with self._model_lock, torch.no_grad():
            for n, p in self.named.items():
                p.copy_(torch.from_numpy(np.asarray(state[n])).to(p.device, p.dtype))

    def numpy_state(self) -> State:
        with self._model_lock:
            return {n: p.detach().cpu().numpy().copy() for n, p in self.named.items()}


class Aggregator:
    """Weighted averaging rounds over the devices connected to the cloud."""

    def __init__(
        self,
        expected: int,
        timeout: float,
        on_round: Callable[[list[int], list[float]], None] | None = None,
    ) -> None:
        self.expected = expected
        self.timeout = timeout
        self.on_round = on_round
        self._cond = threading.Condition()
        self.members: set[int] = set()
        self.gone: set[int] = set()
        self._pending: dict[int, dict[int, tuple[State, float]]] = {}
        self._done: dict[int, tuple[State, int]] = {}
        self.rounds: list[dict[str, Any]] = []  # one record per completed round

    def join(self, device_id: int) -> None:
        with self._cond:
            self.members.add(device_id)
            self.gone.discard(device_id)
            self._cond.notify_all()

    def leave(self, device_id: int) -> None:
        with self._cond:
            self.gone.add(device_id)
            self._cond.notify_all()

    def _ready(self, rnd: int) -> bool:
        alive = self.members - self.gone
        return len(self.members) >= self.expected and alive <= set(self._pending[rnd])

    def _complete(self, rnd: int, timed_out: bool) -> None:
        entries = self._pending.pop(rnd)
        ids = sorted(entries)  # a fixed order: the same average on every run
        weights = [entries[d][1] for d in ids]
        avg = weighted_average([entries[d][0] for d in ids], weights)
        if self.on_round is not None:
            self.on_round(ids, weights)
        self._done[rnd] = (avg, len(ids))
        self.rounds.append({"round": rnd, "devices": ids, "timed_out": timed_out})
        self._cond.notify_all()

    def submit(self, rnd: int, device_id: int, state: State, weight: float) -> tuple[State, int]:
        """Add a device's state to round `rnd`; block until the round is averaged."""
        with self._cond:
            if rnd in self._done:  # late: the round closed without this device
                return self._done[rnd]
            self._pending.setdefault(rnd, {})[device_id] = (state, weight)
            deadline = time.monotonic() + self.timeout
            while rnd not in self._done:
                if self._ready(rnd):
                    self._complete(rnd, timed_out=False)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "round %s: timed out waiting; averaging %s", rnd, sorted(self._pending[rnd])
                    )
                    self._complete(rnd, timed_out=True)
                    break
                self._cond.wait(timeout=min(left, 1.0))
            return self._done[rnd]


class LMSession(SplitSession):
    """A device stream of a splitfed cloud: split messages plus `Aggregate`."""

    def __init__(self, service: SplitFedCloud, cloud: LMCloud, device_id: int) -> None:
        super().__init__(cloud, device_id)
        self.service = service

    def handle(self, msg: pb.DeviceMessage) -> tuple[pb.CloudMessage, After]:
        kind = msg.WhichOneof("kind")
        if kind == "aggregate":
            if not self.greeted:
                raise ProtocolError("the first message must be hello, not aggregate")
            return self._aggregate(msg.aggregate), None
        reply, after = super().handle(msg)
        if kind == "hello":
            self.service.aggregator.join(self.device_id)
        return reply, after

    def close(self) -> None:
        super().close()
        self.service.aggregator.leave(self.device_id)

    def _aggregate(self, agg: pb.Aggregate) -> pb.CloudMessage:
        cloud = self.cloud
        assert isinstance(cloud, LMCloud)
        if not np.isfinite(agg.weight) or agg.weight <= 0:
            raise MalformedMessage(f"aggregate.weight {agg.weight} must be a positive number")
        state = {
            n: from_wire(t, f"aggregate.state[{n}]", dtypes=("float32",)).numpy()
            for n, t in agg.state.items()
        }
        reference = {n: np.zeros(s, dtype=np.float32) for n, s in cloud.device_shapes.items()}
        problem = check_update(state, reference)
        if problem is not None:
            raise MalformedMessage(f"aggregate.state: {problem}")
        avg, participants = self.service.aggregator.submit(
            int(agg.round), self.device_id, state, float(agg.weight)
        )
        out = pb.Averaged(round=agg.round, participants=participants)
        for n, v in avg.items():
            out.state[n].CopyFrom(to_wire(torch.from_numpy(np.ascontiguousarray(v))))
        return pb.CloudMessage(averaged=out)


class SplitFedCloud:
    """The splitfed cloud: one shared `LMCloud` or one per device, and the aggregator."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.mode = cfg.split.server
        n = cfg.federated.clients
        self.shared = LMCloud(cfg, schedule_scale=n) if self.mode == "shared" else None
        self.replicas: dict[int, LMCloud] = {}
        self._lock = threading.Lock()
        timeout = cfg.federated.round_timeout or cfg.runtime.timeout_s
        self.aggregator = Aggregator(n, timeout, self._average_clouds)

    def cloud_for(self, device_id: int) -> LMCloud:
        if self.shared is not None:
            return self.shared
        with self._lock:
            if device_id not in self.replicas:
                self.replicas[device_id] = LMCloud(self.cfg)
            return self.replicas[device_id]

    def open_session(self, device_id: int) -> LMSession:
        return LMSession(self, self.cloud_for(device_id), device_id)

    def clouds(self) -> list[LMCloud]:
        if self.shared is not None:
            return [self.shared]
        with self._lock:
            return [self.replicas[d] for d in sorted(self.replicas)]

    def _average_clouds(self, ids: list[int], weights: list[float]) -> None:
        """per_client: average this round's cloud copies into every copy."""
        if self.shared is not None:
            return
        with self._lock:
            replicas = dict(self.replicas)
        built = [d for d in ids if d in replicas and replicas[d].built]
        if not built:
            return
        avg = weighted_average(
            [replicas[d].numpy_state() for d in built], [weights[ids.index(d)] for d in built]
        )
        for replica in replicas.values():
            if replica.built:
                replica.load_trainable(avg)

    # what the runtime reports and saves --------------------------------------------

    @property
    def steps(self) -> int:
        return sum(c.steps for c in self.clouds())

    def trainable_count(self) -> int:
        """Trainable parameters of one cloud model (per_client holds one per device)."""
        clouds = self.clouds()
        return clouds[0].trainable_count() if clouds else 0

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The cloud's trainable tensors (per_client: the copies are equal after each
        averaging round; the lowest device id's copy)."""
        clouds = [c for c in self.clouds() if c.built]
        return clouds[0].trainable_state() if clouds else {}
