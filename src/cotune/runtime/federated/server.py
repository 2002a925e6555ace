"""The ServerApp's work: hand-shake with the SuperNodes, run the rounds, evaluate the
global model on the server every round, log, checkpoint, and write the result.

It runs in the ServerApp (a thread of `cotune run` in simulation, a `flwr-serverapp`
process next to the SuperLink in deployment) and talks to its caller only through
the run folder: config.toml in; metrics.jsonl, train.jsonl, checkpoint/,
predictions.jsonl (the last evaluation, one line per eval example; and generations.jsonl
for generation tasks) and federated_result.json out.
"""

from __future__ import annotations

import json
import logging
import resource
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from cotune.config import Config, build_config, to_toml
from cotune.methods import ServerHook, resolve
from cotune.methods.federated.global_model import GlobalModel
from cotune.methods.registry import federated_spec
from cotune.models.base_dtype import weight_bytes
from cotune.report import RunFolder, progress
from cotune.report.trackers import open_trackers
from cotune.runtime.federated.checkpoint import ServerCheckpoint, load_checkpoint, save_checkpoint
from cotune.runtime.federated.grid import CountingGrid
from cotune.runtime.federated.keys import (
    ARRAYS_KEY,
    CONFIG_TEXT_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    RESULT_FILE,
    WEIGHT_KEY,
    number,
)
from cotune.runtime.federated.records import from_arrays, to_arrays
from cotune.runtime.federated.strategy import CotuneFedAvg
from cotune.training import Evaluation

log = logging.getLogger("cotune.federated")

DEFAULT_ROUND_TIMEOUT = 3600.0
CONNECT_TIMEOUT = 300.0  # seconds to wait for every SuperNode to connect


@dataclass
class ServerOptions:
    """What the ServerApp reads from Flower's run config."""

    run_dir: Path
    resume: bool = False
    stop_after: int = 0  # stop after this round (0: run every round)
    connect_timeout: float = CONNECT_TIMEOUT

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ServerOptions:
        run_dir = str(run_config.get("run-dir", ""))
        if not run_dir:
            raise ValueError(
                "the cotune ServerApp needs run-config key 'run-dir' (a folder holding "
                "config.toml); e.g. flwr run APP_DIR --run-config 'run-dir=\"/abs/run\"'"
            )
        return cls(
            run_dir=Path(run_dir),
            resume=bool(run_config.get("resume", False)),
            stop_after=int(run_config.get("stop-after", 0)),
            connect_timeout=float(run_config.get("connect-timeout", CONNECT_TIMEOUT)),
        )

    def to_run_config(self) -> dict[str, Any]:
        return {
            "run-dir": str(self.run_dir),
            "resume": self.resume,
            "stop-after": self.stop_after,
            "connect-timeout": self.connect_timeout,
        }


def config_from_text(text: str) -> Config:
    return resolve(build_config(tomllib.loads(text)))


def discover_partitions(grid: CountingGrid, n_clients: int, timeout: float) -> dict[int, int]:
    """partition id -> node id, asked of every connected node (a `query` message).

    Waits (bounded by `timeout`) until `n_clients` distinct partitions have answered.
    """
    deadline = time.monotonic() + timeout
    node_of: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            msgs = [
                Message(
                    RecordDict({"config": ConfigRecord({})}),
                    dst_node_id=n,
                    message_type=MessageType.QUERY,
                )
                for n in new
            ]
            remaining = max(1.0, deadline - time.monotonic())
            for reply in grid.send_and_receive(msgs, timeout=remaining):
                asked.add(reply.metadata.src_node_id)
                if reply.has_error():
                    log.warning(
                        "node %d failed the hand-shake: %s",
                        reply.metadata.src_node_id,
                        reply.error.reason,
                    )
                    continue
                part = int(
                    number(reply.content.metric_records[METRICS_KEY][PARTITION_KEY], PARTITION_KEY)
                )
                if part in node_of and node_of[part] != reply.metadata.src_node_id:
                    raise RuntimeError(f"two SuperNodes claim partition-id {part}")
                node_of[part] = reply.metadata.src_node_id
        if len(node_of) >= n_clients:
            return node_of
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(node_of)} of federated.clients = {n_clients} SuperNodes connected "
                f"within {timeout:.0f} s (partitions {sorted(node_of)})"
            )
        time.sleep(0.2)


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class FederatedServer:
    """Runs one federated experiment (or its continuation) over a Flower Grid."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.cfg = config_from_text((options.run_dir / "config.toml").read_text())
        self.run = RunFolder(options.run_dir, echo=progress.echo(self.cfg.federated.rounds))

    def _open_trackers(self) -> None:
        text = (self.options.run_dir / "config.toml").read_text()
        self.run.trackers = open_trackers(
            self.cfg.runtime.loggers, self.options.run_dir, self.cfg.model_dump(mode="json"), text
        )

    def run_rounds(self, grid: Grid) -> dict[str, Any]:
        self._open_trackers()
        try:
            return self._run_rounds(grid)
        finally:
            self.run.close_trackers()

    def _run_rounds(self, grid: Grid) -> dict[str, Any]:
        t_start = time.perf_counter()
        cfg, fed = self.cfg, self.cfg.federated
        model = GlobalModel(cfg)
        hook = federated_spec(cfg).server_hook(cfg, model)
        totals: dict[str, Any] = {"bytes_up": 0, "bytes_down": 0, "wall_s": 0.0,
                                  "client_peak_rss_bytes": 0, "client_saved_activation_bytes": 0,
                                  "client_bytes": {}}  # fmt: skip
        first = 1
        ckpt = load_checkpoint(self.options.run_dir) if self.options.resume else None
        if self.options.resume and ckpt is None:
            log.warning("no checkpoint in %s: starting from round 1", self.options.run_dir)
        if ckpt is not None:
            model.load(ckpt.global_state)
            hook.load_state_dict(ckpt.hook_state)
            totals.update(ckpt.totals)
            first = ckpt.round + 1
            self.run.truncate_after("round", ckpt.round)
            log.info("resuming after round %d", ckpt.round)
        counting = CountingGrid(grid)
        counting.bytes_up, counting.bytes_down = int(totals["bytes_up"]), int(totals["bytes_down"])
        strategy = CotuneFedAvg(fraction=fed.fraction, seed=cfg.seed, hook=hook)
        strategy.set_partitions(
            discover_partitions(counting, fed.clients, self.options.connect_timeout)
        )
        config_text = to_toml(cfg)
        timeout = fed.round_timeout or DEFAULT_ROUND_TIMEOUT
        wall0 = float(totals["wall_s"])
        last: dict[str, float] = {}
        evaluation: Evaluation | None = None
        completed = first - 1
        for rnd in range(first, fed.rounds + 1):
            up0, down0 = counting.bytes_up, counting.bytes_down
            messages = strategy.configure_train(
                rnd, to_arrays(model.state()), ConfigRecord({CONFIG_TEXT_KEY: config_text}), grid
            )
            messages = _add_extras(hook, rnd, list(messages), strategy.node_of)
            replies = counting.send_and_receive(messages, timeout=timeout)
            _add_client_bytes(totals, counting, strategy.node_of)
            arrays, client_metrics = strategy.aggregate_train(rnd, replies)
            outcome = strategy.outcome
            _observe_replies(hook, rnd, replies, outcome.accepted)
            for part, reason in sorted({**outcome.failed, **outcome.rejected}.items()):
                kind = "client_failed" if part in outcome.failed else "update_rejected"
                self.run.log_train(
                    {"round": rnd, "event": kind, "partition": part, "reason": reason}
                )
            for part in outcome.timed_out:
                self.run.log_train({"round": rnd, "event": "client_timed_out", "partition": part})
            if arrays is not None:
                model.load(hook.after_aggregate(rnd, from_arrays(arrays)))
            else:
                log.warning("round %d: no update accepted; the global model is unchanged", rnd)
            cm = dict(client_metrics or {})
            for key in ("peak_rss_bytes", "saved_activation_bytes"):
                if key in cm:
                    totals[f"client_{key}"] = max(
                        int(totals[f"client_{key}"]), int(number(cm[key], key))
                    )
            final = rnd == fed.rounds or bool(
                self.options.stop_after and rnd >= self.options.stop_after
            )
            scored = final or rnd % fed.eval_every == 0
            if scored:
                evaluation = model.evaluation()
                last = evaluation.metrics
            totals["bytes_up"], totals["bytes_down"] = counting.bytes_up, counting.bytes_down
            totals["wall_s"] = wall0 + (time.perf_counter() - t_start)
            self.run.log_eval(
                {
                    "round": rnd,
                    **(last if scored else {}),
                    **hook.round_metrics(),
                    **({"train_loss": cm["train_loss"]} if "train_loss" in cm else {}),
                    **outcome.counts(),
                    "round_bytes_up": counting.bytes_up - up0,
                    "round_bytes_down": counting.bytes_down - down0,
                    "bytes_up": counting.bytes_up,
                    "bytes_down": counting.bytes_down,
                    "wall_s": totals["wall_s"],
                }
            )
            if cfg.runtime.checkpoint:
                save_checkpoint(
                    self.options.run_dir,
                    ServerCheckpoint(rnd, model.state(), hook.state_dict(), dict(totals)),
                )
            completed = rnd
            if self.options.stop_after and rnd >= self.options.stop_after:
                break
        if evaluation is None:  # nothing left to run (resumed a finished run): score it as is
            evaluation = model.evaluation()
            last = evaluation.metrics
        self.run.write_predictions(evaluation.predictions)
        model.adapter.save_outputs(self.options.run_dir, evaluation)
        held = hook.device_model()
        result = {
            "metrics": last,
            "rounds_completed": completed,
            "rounds": fed.rounds,
            "bytes_up": totals["bytes_up"],
            "bytes_down": totals["bytes_down"],
            # per partition: its train messages and replies (the hand-shake is in the totals)
            "client_bytes": dict(sorted(totals["client_bytes"].items(), key=lambda kv: int(kv[0]))),
            "wall_s": totals["wall_s"],
            "trainable_device": model.trainable,
            # what a client stores of its model (clients build the global model, or the
            # hook's device model, exactly as the server did)
            "device_weight_bytes": weight_bytes(held if held is not None else model.model),
            "trainable_cloud": hook.trainable,
            "client_peak_rss_bytes": totals["client_peak_rss_bytes"] or None,
            "client_saved_activation_bytes": totals["client_saved_activation_bytes"] or None,
            "server_peak_rss_bytes": _peak_rss_bytes(),
        }
        (self.options.run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        return result


def _add_client_bytes(
    totals: dict[str, Any], counting: CountingGrid, node_of: dict[int, int]
) -> None:
    """Add the round's bytes to and from each partition to `totals["client_bytes"]`
    (partition id as text -> {"down", "up"}: JSON keys, checkpointed with the totals)."""
    part_of = {node: part for part, node in node_of.items()}
    per = totals.setdefault("client_bytes", {})
    for node in {*counting.last_down, *counting.last_up}:
        if node not in part_of:
            continue
        entry = per.setdefault(str(part_of[node]), {"down": 0, "up": 0})
        entry["down"] += counting.last_down.get(node, 0)
        entry["up"] += counting.last_up.get(node, 0)


def _add_extras(
    hook: ServerHook, rnd: int, messages: list[Message], node_of: dict[int, int]
) -> list[Message]:
    """Per-client ArrayRecords from the hook's `extras_for(partition, round)` (fedpft's
    proxy weights), added to each train message before it is sent (and counted)."""
    part_of = {node: part for part, node in node_of.items()}
    for msg in messages:
        extras = hook.extras_for(part_of[msg.metadata.dst_node_id], rnd)
        if extras:
            records = dict(msg.content.items())
            records.update({k: to_arrays(v) for k, v in extras.items()})
            msg.content = RecordDict(records)
    return messages


def _observe_replies(
    hook: ServerHook, rnd: int, replies: list[Message], accepted: list[int]
) -> None:
    """Hand the hook each successful reply's extra ArrayRecords."""
    for msg in replies:
        if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
            continue
        metrics = msg.content.metric_records[METRICS_KEY]
        part = int(number(metrics[PARTITION_KEY], PARTITION_KEY))
        extras = {
            k: from_arrays(v) for k, v in msg.content.array_records.items() if k != ARRAYS_KEY
        }
        weight = number(metrics.get(WEIGHT_KEY, 0.0), WEIGHT_KEY)
        hook.observe_reply(rnd, part, extras, weight, part in accepted)
