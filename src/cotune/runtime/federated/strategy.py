"""cotune's FedAvg on Flower's message API: seeded client sampling by partition,
updates checked before they are averaged, weighted by examples in a fixed order.

It is a `flwr.serverapp.strategy.FedAvg` (so Flower's `Strategy.start` can drive it
too); cotune's server loop calls `configure_train` / `aggregate_train` itself to add
checkpoints, server hooks and evaluation between rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from cotune.methods.federated.aggregation import check_update, weighted_average
from cotune.methods.spec import AcceptedUpdate, ServerHook, State
from cotune.runtime.federated.client_sampling import sample_partitions
from cotune.runtime.federated.keys import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, WEIGHT_KEY, number
from cotune.runtime.federated.records import from_arrays, to_arrays

log = logging.getLogger("cotune.federated")


@dataclass
class RoundOutcome:
    """What happened to each sampled client in one round."""

    sampled: list[int] = field(default_factory=list)  # partition ids
    accepted: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # partition -> error reason
    rejected: dict[int, str] = field(default_factory=dict)  # partition -> why not aggregated
    timed_out: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "clients_sampled": len(self.sampled),
            "clients_ok": len(self.accepted),
            "clients_failed": len(self.failed),
            "clients_rejected": len(self.rejected),
            "clients_timed_out": len(self.timed_out),
        }


class QuietFlower:
    """Raise the flwr logger to ERROR inside a `with` block."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("flwr")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


class CotuneFedAvg(FedAvg):
    """FedAvg over partitions: sample `fraction` of them per round (seeded), send the
    global arrays (as the method's hook shapes them for each client, `state_for`), drop
    replies that are errors or fail `check_update` against what that client received,
    and combine the rest with the hook's `aggregate`, by default averaged weighted by
    `num-examples`, summed in partition order.

    `global_state` is the round's global state; `sent_to(node)` the partition a node
    trains this round (SecAgg+ and DP read them)."""

    def __init__(self, fraction: float, seed: int, hook: ServerHook | None = None) -> None:
        # FedAvg warns that client-side evaluation is off: the server evaluates instead.
        with QuietFlower():
            self._init_fedavg(fraction)
        self.seed = seed
        self.hook = hook or ServerHook()
        self.node_of: dict[int, int] = {}  # partition -> node id
        self._global: State = {}
        self._reference: dict[int, State] = {}  # partition -> the state it was sent
        self._sent: dict[int, int] = {}  # node id -> partition, this round
        self.outcome = RoundOutcome()
        # differential privacy (`dp.py`) sets these: replies screened before they are
        # clipped, every client weighs the same, and the average divides by the planned
        # number of clients however many replied
        self.prescreened = False
        self.uniform = False
        self.denominator: int | None = None

    def _init_fedavg(self, fraction: float) -> None:
        super().__init__(
            fraction_train=fraction,
            fraction_evaluate=0.0,  # the server evaluates the global model itself
            min_train_nodes=1,
            min_evaluate_nodes=0,
            min_available_nodes=1,
            weighted_by_key=WEIGHT_KEY,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )

    def set_partitions(self, node_of: dict[int, int]) -> None:
        """Which node holds each partition (from the start-up handshake)."""
        self.node_of = dict(node_of)

    @property
    def global_state(self) -> State:
        return self._global

    def sent_to(self, node_id: int) -> int | None:
        return self._sent.get(node_id)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        partitions = sample_partitions(
            list(self.node_of), self.fraction_train, self.seed, server_round
        )
        self._global = from_arrays(arrays)
        self._sent = {self.node_of[p]: p for p in partitions}
        self.outcome = RoundOutcome(sampled=partitions)
        config["server-round"] = server_round
        messages: list[Message] = []
        self._reference = {}
        for p in partitions:
            state = self.hook.state_for(p, server_round, self._global)
            self._reference[p] = state
            record = RecordDict(
                {ARRAYS_KEY: arrays if state is self._global else to_arrays(state),
                 CONFIG_KEY: config}
            )  # fmt: skip
            messages.extend(self._construct_messages(record, [self.node_of[p]], MessageType.TRAIN))
        return messages

    def screen(self, replies: Iterable[Message]) -> list[Message]:
        """The replies that may be aggregated (no error, `check_update` passed against
        what that client received), in partition order; what happened to every sampled
        client is recorded in `outcome`."""
        out = self.outcome
        accepted: list[tuple[int, Message]] = []
        seen: set[int] = set()
        for msg in replies:
            part = self._sent.get(msg.metadata.src_node_id)
            if part is None or part in seen:
                continue
            seen.add(part)
            if msg.has_error():
                out.failed[part] = str(msg.error.reason)
                log.warning("round client %d failed: %s", part, msg.error.reason)
                continue
            reason = _reply_problem(msg, self._reference[part])
            if reason is None:
                accepted.append((part, msg))
            else:
                out.rejected[part] = reason
                log.warning("update of client %d rejected: %s", part, reason)
        out.timed_out = sorted(set(self._sent.values()) - seen)
        for part in out.timed_out:
            log.warning("client %d sent no reply before the round timeout", part)
        accepted.sort(key=lambda a: a[0])
        out.accepted = [a[0] for a in accepted]
        return [m for _, m in accepted]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """`screen` the replies (unless `prescreened`: a wrapper screened them before
        clipping) and combine the accepted updates."""
        accepted = list(replies) if self.prescreened else self.screen(replies)
        if not accepted:
            return None, None
        parsed = []
        for msg in accepted:
            part = self._sent[msg.metadata.src_node_id]
            metrics = msg.content.metric_records[METRICS_KEY]
            state = from_arrays(msg.content.array_records[ARRAYS_KEY])
            weight = 1.0 if self.uniform else number(metrics[WEIGHT_KEY], WEIGHT_KEY)
            parsed.append((part, state, weight, metrics))
        parsed.sort(key=lambda a: a[0])
        updates = [AcceptedUpdate(p, s, w) for p, s, w, _ in parsed]
        combined = self.hook.aggregate(server_round, updates, self._global)
        if combined is not None:
            state = combined
        else:
            state = weighted_average([u.state for u in updates], [u.weight for u in updates])
            if self.denominator is not None and len(updates) < self.denominator:
                state = _shrink(state, self._global, len(updates) / self.denominator)
        examples = [(number(m[WEIGHT_KEY], WEIGHT_KEY), m) for _, _, _, m in parsed]
        return to_arrays(state), client_metrics_of(examples)


def _shrink(average: State, reference: State, factor: float) -> State:
    """`reference + factor * (average - reference)`: an average of k updates turned
    into their sum over the planned n clients (factor k / n)."""
    return {
        k: (
            reference[k].astype(np.float64) + factor * (v.astype(np.float64) - reference[k])
        ).astype(v.dtype)
        for k, v in average.items()
    }


PEAK_KEYS = ("peak_rss_bytes", "saved_activation_bytes")


def client_metrics_of(replies: list[tuple[float, MetricRecord]]) -> MetricRecord:
    """Example-weighted means of the clients' metrics; maxima of their peak memory."""
    total = sum(w for w, _ in replies)
    out: dict[str, int | float | list[int] | list[float]] = {}
    keys = set.intersection(*(set(m) for _, m in replies)) - {WEIGHT_KEY, "partition-id"}
    for key in sorted(keys):
        values = [(w, float(v)) for w, m in replies if isinstance(v := m[key], int | float)]
        if len(values) != len(replies):
            continue
        if key in PEAK_KEYS:
            out[key] = float(max(v for _, v in values))
        else:
            out[key] = float(sum(w * v for w, v in values) / total)
    out["examples"] = float(total)
    return MetricRecord(out)


def _reply_problem(msg: Message, reference: State) -> str | None:
    content = msg.content
    if ARRAYS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        return f"reply lacks the {ARRAYS_KEY!r} ArrayRecord or the {METRICS_KEY!r} MetricRecord"
    weight = content.metric_records[METRICS_KEY].get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not weight > 0:
        return f"{WEIGHT_KEY} must be a positive number, got {weight!r}"
    try:
        state = from_arrays(content.array_records[ARRAYS_KEY])
    except (TypeError, ValueError) as err:
        return f"arrays cannot be decoded: {err}"
    return check_update(state, reference)
