"""SecAgg+ secure aggregation with Flower's own protocol: the server learns only the
example-weighted sum of a round's updates, never one client's.

Server: `SecAggRound` drives the four stages of Flower's `SecAggPlusWorkflow` (setup,
share keys, collect masked vectors, unmask) over the run's grid, so every stage's
messages are counted like any other. The workflow was written for Flower's legacy
strategies; cotune hands it the round's train messages (what `CotuneFedAvg` built
for each sampled node) in place of the legacy fit instructions, and reads the
unmasked, dequantised average back from the legacy `aggregate_fit` call.

Client: `client_mods.secagg_mod` runs Flower's `secaggplus_mod`; what is masked is
each client's update (trained minus received weights) and its example count, so the
server adds the unmasked average update to the round's global state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    parameters_to_ndarrays,
)
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from cotune.methods.protection import SecAggPlan
from cotune.runtime.federated.records import to_arrays
from cotune.runtime.federated.strategy import CotuneFedAvg, QuietFlower, client_metrics_of

log = logging.getLogger("cotune.federated")

STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


@dataclass
class _Proxy:
    """What the workflow reads of a legacy client proxy: its node id."""

    node_id: int


class _LegacyStrategy:
    """The two calls the workflow makes on a legacy strategy: `configure_fit` (the
    round's sampled nodes) and `aggregate_fit` (every result then carries the unmasked
    average; it is kept here, with the clients' example counts and metrics)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.results: list[tuple[_Proxy, FitRes]] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any):  # type: ignore[no-untyped-def]
        empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
        return [(_Proxy(n), FitIns(empty, {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any):  # type: ignore[no-untyped-def]
        self.results = list(results)
        return None, {}


class SecAggRound:
    """One round of SecAgg+ over `grid` with `plan`'s shares, threshold and clip range;
    `max_weight` is the largest example count of a client (the weights are scaled by
    it before quantisation)."""

    def __init__(self, plan: SecAggPlan, max_weight: float, timeout: float | None) -> None:
        self.plan = plan
        with QuietFlower():
            self.workflow = SecAggPlusWorkflow(
                num_shares=plan.shares,
                reconstruction_threshold=plan.threshold,
                max_weight=float(max(max_weight, 1.0)),
                clipping_range=plan.clip_range,
                timeout=timeout,
            )
        self.halted_at: str | None = None

    def run(
        self, grid: Grid, strategy: CotuneFedAvg, server_round: int, messages: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run the protocol for the round's train `messages` (one per sampled node);
        the new global arrays and the clients' mean metrics, or (None, None) when too
        few clients were left to unmask. Fills `strategy.outcome`."""
        content = {m.metadata.dst_node_id: m.content for m in messages}
        legacy = _LegacyStrategy(sorted(content))
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=cast(Any, legacy),
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        state = WorkflowState()
        self.halted_at = None
        steps = (
            self.workflow.setup_stage,
            self.workflow.share_keys_stage,
            self.workflow.collect_masked_vectors_stage,
            self.workflow.unmask_stage,
        )
        with QuietFlower():
            for name, step in zip(STAGES, steps, strict=True):
                try:
                    ok = step(grid, context, state)
                except (ValueError, KeyError, TypeError) as err:  # a malformed reply
                    log.warning("SecAgg+ %s stage failed: %s", name, err)
                    ok = False
                if not ok:
                    self.halted_at = name
                    why = "; ".join(str(f) for f in state.failures[:3])
                    log.warning("SecAgg+ halted at the %s stage%s", name, f": {why}" if why else "")
                    break
                if name == "setup":  # the train messages in place of legacy fit ins
                    state.nid_to_fitins = dict(content)
        return self._outcome(strategy, legacy)

    def _outcome(
        self, strategy: CotuneFedAvg, legacy: _LegacyStrategy
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = strategy.outcome
        done = {}
        for proxy, fitres in legacy.results:
            part = strategy.sent_to(proxy.node_id)
            if part is not None:
                done[part] = fitres
        out.accepted = sorted(done) if self.halted_at is None else []
        why = f"SecAgg+ halted at the {self.halted_at} stage: too few clients left"
        for part in out.sampled:
            if part not in out.accepted:
                out.failed[part] = why if self.halted_at else "dropped out of SecAgg+"
        if not out.accepted:
            return None, None
        mean = parameters_to_ndarrays(legacy.results[0][1].parameters)
        reference = strategy.global_state
        if len(mean) != len(reference):
            raise RuntimeError("SecAgg+ returned a sum of another shape than the model")
        state = {
            name: (ref.astype(np.float64) + delta).astype(ref.dtype)
            for (name, ref), delta in zip(reference.items(), mean, strict=True)
        }
        metrics = [
            (float(done[p].num_examples), MetricRecord(_numbers(done[p].metrics)))
            for p in out.accepted
        ]
        return to_arrays(state), client_metrics_of(metrics)


def _numbers(metrics: dict[str, Any]) -> dict[str, int | float | list[int] | list[float]]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
