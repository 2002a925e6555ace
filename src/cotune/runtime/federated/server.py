"""The ServerApp's work: hand-shake with the SuperNodes, run the rounds, evaluate the
global model on the server every round, log, checkpoint, and write the result.

It runs in the ServerApp (a thread of `cotune run` in simulation, a `flwr-serverapp`
process next to the SuperLink in deployment) and talks to its caller only through
the run folder: config.toml in; metrics.jsonl, train.jsonl, checkpoint/,
predictions.jsonl (the last evaluation, one line per eval example; and generations.jsonl
for generation tasks), trainable.safetensors (the final global model's trainable
tensors) and federated_result.json out.

With `federated.client_data = "node"` every node brings its own data and the server
opens no training file: the hand-shake carries the config, each node answers with
its data's example count, fingerprint and class names (or the user error that stops
the run), the server assigns client ids (`partition-id` of a node's config, else in
order of the data fingerprints), fixes the class list (`task.labels`: the union of the
nodes' classes, unless the config gives it), and scores the global model on its own
evaluation data, or, without any, by a federated evaluation on the nodes' data.
"""

from __future__ import annotations

import json
import logging
import resource
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from cotune.config import Config, build_config, to_toml
from cotune.errors import ConfigError, DataError
from cotune.methods import ServerHook, resolve
from cotune.methods.federated.data import split_for
from cotune.methods.federated.global_model import GlobalModel
from cotune.methods.protection import rounds_budget, secagg_plan
from cotune.methods.registry import federated_spec
from cotune.models.base_dtype import weight_bytes
from cotune.report import RunFolder, progress
from cotune.report.trackers import open_trackers
from cotune.runtime.federated.checkpoint import (
    ServerCheckpoint,
    load_checkpoint,
    save_checkpoint,
    save_final_state,
)
from cotune.runtime.federated.dp import RoundsDP
from cotune.runtime.federated.faults import faulty_clients, mark
from cotune.runtime.federated.grid import CountingGrid
from cotune.runtime.federated.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    CONFIG_TEXT_KEY,
    DATA_PATH_KEY,
    ERROR_KEY,
    EXAMPLES_KEY,
    LABELS_KEY,
    METRICS_KEY,
    NODE_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_KEY,
    RESULT_FILE,
    SHA_KEY,
    TRAIN_S_KEY,
    WEIGHT_KEY,
    number,
)
from cotune.runtime.federated.network import FleetNetwork
from cotune.runtime.federated.records import from_arrays, to_arrays
from cotune.runtime.federated.secagg import SecAggRound
from cotune.runtime.federated.strategy import CotuneFedAvg
from cotune.training import Evaluation

log = logging.getLogger("cotune.federated")

DEFAULT_ROUND_TIMEOUT = 3600.0
CONNECT_TIMEOUT = 300.0  # seconds to wait for every SuperNode to connect
PROBLEM_GRACE = 10.0  # seconds to wait for the other nodes' answers after a problem


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
                metrics = reply.content.metric_records[METRICS_KEY]
                part = int(number(metrics[PARTITION_KEY], PARTITION_KEY))
                parts = int(number(metrics.get(NUM_PARTITIONS_KEY, 0), NUM_PARTITIONS_KEY))
                if parts and parts != n_clients:
                    raise ConfigError(
                        f"the federation's SuperNodes hold {parts} partitions (num-partitions) "
                        f"but federated.clients = {n_clients}: they must agree; in a Flower "
                        f"simulation run with --federation-config 'num-supernodes={n_clients}' "
                        f"or set federated.clients = {parts}"
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


@dataclass
class NodeData:
    """A node's own data as it described it in the hand-shake."""

    node_id: int
    partition: int  # its node config's partition-id, -1 if none (the server assigns one)
    data_path: str
    examples: int
    sha256: str
    labels: list[str]


def _ask(
    grid: CountingGrid, nodes: list[int], content: RecordDict, timeout: float
) -> list[Message]:
    msgs = [
        Message(RecordDict(dict(content.items())), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    return grid.send_and_receive(msgs, timeout=timeout)


def discover_nodes(
    grid: CountingGrid, n_clients: int, timeout: float, config_text: str
) -> list[NodeData]:
    """Every node's own data, asked with a `query` carrying the run's config (each node
    loads its data to answer). Waits (bounded by `timeout`) for `n_clients` nodes; a
    node that cannot use its data (no data-path, a missing file, the wrong columns)
    stops the run with a `UserError` naming it."""
    deadline = time.monotonic() + timeout
    content = RecordDict({CONFIG_KEY: ConfigRecord({CONFIG_TEXT_KEY: config_text})})
    found: dict[int, NodeData] = {}
    asked: set[int] = set()
    problems: list[str] = []
    since: float | None = None  # when the first problem was reported
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            remaining = max(1.0, deadline - time.monotonic())
            for reply in _ask(grid, new, content, remaining):
                node = reply.metadata.src_node_id
                asked.add(node)
                if reply.has_error():
                    problems.append(f"node {node} failed the hand-shake: {reply.error.reason}")
                    continue
                info = reply.content.config_records.get(NODE_KEY)
                if info is None:
                    problems.append(f"node {node} did not describe its data")
                    continue
                path = str(info.get(DATA_PATH_KEY, ""))
                if ERROR_KEY in info:
                    where = f" (data-path {path!r})" if path else ""
                    problems.append(f"SuperNode {node}{where}: {info[ERROR_KEY]!s}")
                    continue
                metrics = reply.content.metric_records[METRICS_KEY]
                labels = info.get(LABELS_KEY, [])
                found[node] = NodeData(
                    node_id=node,
                    partition=int(number(metrics[PARTITION_KEY], PARTITION_KEY)),
                    data_path=path,
                    examples=int(number(info[EXAMPLES_KEY], EXAMPLES_KEY)),
                    sha256=str(info[SHA_KEY]),
                    labels=[str(x) for x in labels] if isinstance(labels, list) else [],
                )
        if problems and since is None:
            since = time.monotonic()
        # a problem stops the run, once every node has answered (or a short grace has
        # passed), so that the message names every node's problem
        late = since is not None and time.monotonic() - since > PROBLEM_GRACE
        if problems and (len(asked) >= n_clients or late):
            raise DataError(
                f"{len(problems)} SuperNode(s) cannot train on their own data: "
                + "; ".join(problems)
            )
        if len(found) >= n_clients:
            return [found[n] for n in sorted(found)]
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(found)} of federated.clients = {n_clients} SuperNodes connected "
                f"within {timeout:.0f} s"
            )
        time.sleep(0.2)


def assign_clients(nodes: list[NodeData], n_clients: int) -> dict[int, NodeData]:
    """Client id -> node: a node's own `partition-id` when its config gives one, the
    others take the free ids in order of their data fingerprints (stable across
    restarts, so seeded client sampling picks the same data on resume)."""
    if len(nodes) > n_clients:
        raise ConfigError(
            f"{len(nodes)} SuperNodes connected but federated.clients = {n_clients}; set "
            "federated.clients to the number of SuperNodes"
        )
    fixed = [n for n in nodes if n.partition >= 0]
    bad = [n.partition for n in fixed if n.partition >= n_clients]
    seen = [n.partition for n in fixed]
    if bad or len(set(seen)) != len(seen):
        raise ConfigError(
            f"SuperNode partition-id values {sorted(seen)} must be distinct and below "
            f"federated.clients = {n_clients}"
        )
    out = {n.partition: n for n in fixed}
    free = [i for i in range(n_clients) if i not in out]
    rest = sorted((n for n in nodes if n.partition < 0), key=lambda n: (n.sha256, n.node_id))
    out.update(zip(free, rest, strict=False))
    return out


def union_labels(cfg: Config, nodes: list[NodeData]) -> list[str] | None:
    """The run's classes when the nodes' data define them: `task.labels` if given,
    else the union of the nodes' classes in label order (None: the task fixes them)."""
    from cotune.data.registry import labels_from_data
    from cotune.data.table import label_order

    if not labels_from_data(cfg.task):
        return None
    if cfg.task.labels is not None:
        return list(cfg.task.labels)
    names = label_order(label for n in nodes for label in n.labels)
    if len(names) < 2:
        raise DataError(
            f"the SuperNodes' data hold {len(names)} distinct label(s) ({', '.join(names)}) "
            "between them; classification needs at least 2"
        )
    return names


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class FederatedServer:
    """Runs one federated experiment (or its continuation) over a Flower Grid."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.cfg = config_from_text((options.run_dir / "config.toml").read_text())
        self.run = RunFolder(options.run_dir, echo=progress.echo(self.cfg.federated.rounds))
        self._node_examples: list[int] = []

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
        totals: dict[str, Any] = {"bytes_up": 0, "bytes_down": 0, "wall_s": 0.0,
                                  "client_peak_rss_bytes": 0, "client_saved_activation_bytes": 0,
                                  "client_bytes": {}}  # fmt: skip
        first = 1
        ckpt = load_checkpoint(self.options.run_dir) if self.options.resume else None
        if self.options.resume and ckpt is None:
            log.warning("no checkpoint in %s: starting from round 1", self.options.run_dir)
        if ckpt is not None:
            totals.update(ckpt.totals)
            first = ckpt.round + 1
            self.run.truncate_after("round", ckpt.round)
            log.info("resuming after round %d", ckpt.round)
        network = FleetNetwork.from_config(cfg)
        if network is not None:  # resumed: the clock goes on from the checkpoint
            network.seconds = float(totals.get("network_s", 0.0))
        counting = CountingGrid(grid, network)
        counting.bytes_up, counting.bytes_down = int(totals["bytes_up"]), int(totals["bytes_down"])
        strategy = CotuneFedAvg(fraction=fed.fraction, seed=cfg.seed)
        own = fed.client_data == "node"
        if own:  # the nodes' data decide the client ids and the classes
            cfg = self.cfg = self._meet_nodes(counting, strategy)
        else:
            strategy.set_partitions(
                discover_partitions(counting, fed.clients, self.options.connect_timeout)
            )
        model = GlobalModel(cfg)
        hook = federated_spec(cfg).server_hook(cfg, model)
        strategy.hook = hook  # what each client receives, how updates combine
        budget = rounds_budget(cfg)  # [privacy] federated: Flower's DP wrapper around it
        driver: CotuneFedAvg | RoundsDP = (
            strategy if budget is None else RoundsDP(strategy, budget, cfg.privacy.noise_seed)
        )
        plan = secagg_plan(cfg)
        secagg = None
        if plan is not None:
            secagg = SecAggRound(
                plan, self._max_examples(cfg), fed.round_timeout or DEFAULT_ROUND_TIMEOUT
            )
        if ckpt is not None:
            model.load(ckpt.global_state)
            hook.load_state_dict(ckpt.hook_state)
        client_eval = not model.has_eval
        if client_eval and (not own or federated_spec(cfg).client_evaluate is None):
            raise ConfigError(
                f"the server has no evaluation data for {cfg.task.name!r} and method "
                f"{cfg.method!r} cannot score the global model on the clients' data: give "
                "the server an evaluation set (task.eval_file, or task.data_dir with the "
                "task's evaluation files)"
            )
        config_text = to_toml(cfg)
        timeout = fed.round_timeout or DEFAULT_ROUND_TIMEOUT
        wall0 = float(totals["wall_s"])
        last: dict[str, float] = {}
        evaluation: Evaluation | None = None
        completed = first - 1
        for rnd in range(first, fed.rounds + 1):
            up0, down0 = counting.bytes_up, counting.bytes_down
            counting.reset_last()
            messages = driver.configure_train(
                rnd, to_arrays(model.state()), ConfigRecord({CONFIG_TEXT_KEY: config_text}), grid
            )
            messages = _add_extras(hook, rnd, list(messages), strategy.node_of)
            if own:
                messages = _address(messages, strategy.node_of)
            counting.part_of = {node: part for part, node in strategy.node_of.items()}
            faults = fed.faults
            kinds = faulty_clients(
                strategy.outcome.sampled, faults.fail_fraction, faults.mode, faults.seed, rnd
            )
            if kinds:
                messages = mark(messages, kinds, counting.part_of, time.time() + timeout)
            if secagg is not None:  # the server sees masked vectors and their sum only
                replies = []
                arrays, client_metrics = secagg.run(
                    cast(Grid, counting), strategy, rnd, list(messages)
                )
            else:
                replies = counting.send_and_receive(messages, timeout=timeout)
                arrays, client_metrics = driver.aggregate_train(rnd, replies)
            train_s = _train_times(replies)  # none under SecAgg+: the replies stay inside it
            _add_client_bytes(totals, counting, strategy.node_of)
            outcome = strategy.outcome
            _observe_replies(hook, rnd, replies, outcome.accepted)
            if own:
                for record in _trained_on(rnd, replies):
                    self.run.log_train(record)
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
            if scored and client_eval:
                evaluation = None
                last = self._evaluate_on_clients(counting, strategy, model, rnd, config_text)
            elif scored:
                evaluation = model.evaluation()
                last = evaluation.metrics
            totals["bytes_up"], totals["bytes_down"] = counting.bytes_up, counting.bytes_down
            totals["wall_s"] = wall0 + (time.perf_counter() - t_start)
            if network is not None:
                totals["network_s"] = network.seconds
            self.run.log_eval(
                {
                    "round": rnd,
                    **(last if scored else {}),
                    **hook.round_metrics(),
                    **(driver.round_metrics(rnd) if isinstance(driver, RoundsDP) else {}),
                    **({"train_loss": cm["train_loss"]} if "train_loss" in cm else {}),
                    **outcome.counts(),
                    **({"faults_injected": len(kinds)} if faults.fail_fraction > 0 else {}),
                    # the clients' local training: the slowest one's, and all of it
                    **(
                        {"client_train_s_max": max(train_s), "client_train_s_total": sum(train_s)}
                        if train_s
                        else {}
                    ),  # fmt: skip
                    "round_bytes_up": counting.bytes_up - up0,
                    "round_bytes_down": counting.bytes_down - down0,
                    "bytes_up": counting.bytes_up,
                    "bytes_down": counting.bytes_down,
                    "wall_s": totals["wall_s"],
                    # the server's time plus each call's slowest client on the network
                    "projected_wall_s": totals["wall_s"]
                    + (network.seconds if network is not None else 0.0),
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
        if client_eval:
            if not last:  # nothing left to run (resumed a finished run): score it as is
                last = self._evaluate_on_clients(counting, strategy, model, completed, config_text)
        else:
            if evaluation is None:  # nothing left to run (resumed a finished run): score it
                evaluation = model.evaluation()
                last = evaluation.metrics
            self.run.write_predictions(evaluation.predictions)
            model.adapter.save_outputs(self.options.run_dir, evaluation)
        save_final_state(self.options.run_dir, model.state())
        if budget is not None:  # the final metrics say what they cost, as a split run's do
            last = {**last, "epsilon": budget.spent(completed)}
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
            **({"network": network.snapshot()} if network is not None else {}),
            "trainable_device": model.trainable,
            # what a client stores of its model (clients build the global model, or the
            # hook's device model, exactly as the server did)
            "device_weight_bytes": weight_bytes(held if held is not None else model.model),
            "trainable_cloud": hook.trainable,
            "client_peak_rss_bytes": totals["client_peak_rss_bytes"] or None,
            "client_saved_activation_bytes": totals["client_saved_activation_bytes"] or None,
            "server_peak_rss_bytes": _peak_rss_bytes(),
            "client_data": fed.client_data,
            "evaluated_on": "clients" if client_eval else "server",
            **(
                {"privacy": {**budget.summary(), "epsilon": budget.spent(completed)}}
                if budget is not None
                else {}
            ),
            **(
                {"secure_aggregation": {**asdict(plan), "max_weight": secagg.workflow.max_weight}}
                if plan is not None and secagg is not None
                else {}
            ),
        }
        (self.options.run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        return result

    def _max_examples(self, cfg: Config) -> int:
        """The most training examples a client holds (SecAgg+ scales each client's
        weight by it): from the nodes' hand-shake, else from the partitions."""
        if self._node_examples:
            return max(self._node_examples)
        return max(split_for(cfg).sizes(), default=1)

    def _meet_nodes(self, grid: CountingGrid, strategy: CotuneFedAvg) -> Config:
        """The hand-shake with nodes that bring their own data: client ids, the
        classes, one `node` record per client in train.jsonl; returns the config the
        run goes on with (`task.labels` fixed)."""
        cfg = self.cfg
        nodes = discover_nodes(
            grid, cfg.federated.clients, self.options.connect_timeout, to_toml(cfg)
        )
        clients = assign_clients(nodes, cfg.federated.clients)
        strategy.set_partitions({part: n.node_id for part, n in clients.items()})
        self._node_examples = [n.examples for n in nodes]
        labels = union_labels(cfg, nodes)
        if labels is not None and labels != cfg.task.labels:
            cfg = cfg.model_copy(deep=True)
            cfg.task.labels = labels
        for part, n in sorted(clients.items()):
            self.run.log_train(
                {"event": "node", "partition": part, "data_path": n.data_path,
                 "examples": n.examples, "data_sha256": n.sha256,
                 **({"labels": n.labels} if n.labels else {})}
            )  # fmt: skip
        return cfg

    def _evaluate_on_clients(
        self,
        grid: CountingGrid,
        strategy: CotuneFedAvg,
        model: GlobalModel,
        rnd: int,
        config_text: str,
    ) -> dict[str, float]:
        """A federated evaluation: every client scores the global model on its own data;
        the example-weighted mean of their metrics (with `eval_clients`,
        `eval_examples`)."""
        arrays = to_arrays(model.state())
        msgs = []
        for part, node in sorted(strategy.node_of.items()):
            config = ConfigRecord(
                {CONFIG_TEXT_KEY: config_text, "server-round": rnd, PARTITION_KEY: part}
            )
            msgs.append(
                Message(
                    RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
                    dst_node_id=node,
                    message_type=MessageType.EVALUATE,
                )
            )
        timeout = self.cfg.federated.round_timeout or DEFAULT_ROUND_TIMEOUT
        scored: list[tuple[float, dict[str, float]]] = []
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
                reason = reply.error.reason if reply.has_error() else "no metrics"
                log.warning("client evaluation failed on node %d: %s",
                            reply.metadata.src_node_id, reason)  # fmt: skip
                continue
            m = reply.content.metric_records[METRICS_KEY]
            weight = number(m[WEIGHT_KEY], WEIGHT_KEY)
            values = {k: float(v) for k, v in m.items() if isinstance(v, int | float)}
            values.pop(WEIGHT_KEY, None)
            values.pop(PARTITION_KEY, None)
            if weight > 0:
                scored.append((weight, values))
        if not scored:
            log.warning("round %d: no client could score the global model", rnd)
            return {}
        total = sum(w for w, _ in scored)
        keys = set.intersection(*(set(v) for _, v in scored))
        out = {k: sum(w * v[k] for w, v in scored) / total for k in sorted(keys)}
        return {**out, "eval_clients": float(len(scored)), "eval_examples": float(total)}


def _address(messages: list[Message], node_of: dict[int, int]) -> list[Message]:
    """Each train message tells its node the client id the server gave it."""
    part_of = {node: part for part, node in node_of.items()}
    for msg in messages:
        records = dict(msg.content.items())
        config = dict(msg.content.config_records[CONFIG_KEY].items())
        config[PARTITION_KEY] = part_of[msg.metadata.dst_node_id]
        records[CONFIG_KEY] = ConfigRecord(config)
        msg.content = RecordDict(records)
    return messages


def _train_times(replies: list[Message]) -> list[float]:
    """The local training time (s) each client that trained reports."""
    out = []
    for msg in replies:
        content = msg.content if not msg.has_error() else None
        if content is not None and METRICS_KEY in content.metric_records:
            metrics = content.metric_records[METRICS_KEY]
            if TRAIN_S_KEY in metrics:
                out.append(float(number(metrics[TRAIN_S_KEY], TRAIN_S_KEY)))
    return out


def _trained_on(rnd: int, replies: list[Message]) -> list[dict[str, Any]]:
    """One train.jsonl record per client that trained: its examples, the fingerprint of
    the data it trained on and its local training time (`train_s`, wall seconds)."""
    out = []
    for msg in replies:
        content = msg.content if not msg.has_error() else None
        if content is None or METRICS_KEY not in content.metric_records:
            continue
        metrics = content.metric_records[METRICS_KEY]
        node = content.config_records.get(NODE_KEY)
        out.append(
            {"round": rnd, "event": "client_trained",
             "partition": int(number(metrics[PARTITION_KEY], PARTITION_KEY)),
             "examples": int(number(metrics.get(WEIGHT_KEY, 0), WEIGHT_KEY)),
             "data_sha256": str(node[SHA_KEY]) if node is not None and SHA_KEY in node else None,
             **({"train_s": float(number(metrics[TRAIN_S_KEY], TRAIN_S_KEY))}
                if TRAIN_S_KEY in metrics else {})}
        )  # fmt: skip
    return sorted(out, key=lambda r: r["partition"])


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
