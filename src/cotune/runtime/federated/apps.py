"""The Flower apps that run every federated method (`FederatedSpec`): the ServerApp runs
the rounds with the method's server hook, the ClientApp calls the method's
`client_train`. They are the components of cotune's Flower App (`cotune.flower_app`,
whose `[tool.flwr.app.components]` name `cotune.flower_app:server_app` and
`:client_app`), which every engine submits with `flwr run`:

- simulation: to a SuperLink in simulation mode (Flower's simulation runtime, Ray
  actors as virtual SuperNodes);
- deployment: to a SuperLink whose SuperNodes run the ClientApp next to each
  device's data;
- inline (tests): the same objects called in one process.

The ServerApp reads its run folder and experiment config from the run config
(`run-dir`, and `config` or the `cotune.*` keys; see `app_config`); the ClientApp
gets the experiment config inside every train message and its data from the
SuperNode's node config: its partition (`partition-id`, `num-partitions`), or with
`federated.client_data = "node"` its own data (`data-path`: a file or folder in the
task's layout, all of which it trains on; optionally `eval-path`, what it scores the
global model on when the server has no evaluation data). In that mode the server
assigns each node its client id (sent with every message) and learns the nodes' data
(example count, fingerprint, class names) in the start-up hand-shake.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp

from cotune.errors import UserError
from cotune.runtime.federated.keys import (
    ARRAYS_KEY,
    AUDIT_OPENS_ENV,
    CONFIG_KEY,
    CONFIG_TEXT_KEY,
    DATA_PATH_KEY,
    ERROR_FILE,
    ERROR_KEY,
    EVAL_PATH_KEY,
    EXAMPLES_KEY,
    LABELS_KEY,
    METRICS_KEY,
    NODE_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_KEY,
    SHA_KEY,
    TRAIN_S_KEY,
    USER_ERROR_FILE,
    WEIGHT_KEY,
    number,
)

if TYPE_CHECKING:
    from cotune.config import Config

# torch, transformers and cotune's training code are imported inside the handlers: a
# SuperNode starts a fresh process per message, and the hand-shake needs none of them.

log = logging.getLogger("cotune.federated")

# ----------------------------------------------------------------------------- server


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp running `FederatedServer`; `defaults` fill run-config keys the
    engine did not set (the simulation engine passes the run folder this way)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from cotune.runtime.federated.app_config import prepare_run_dir
        from cotune.runtime.federated.server import FederatedServer, ServerOptions

        audit = os.environ.get(AUDIT_OPENS_ENV)
        if audit:
            audit_opens(audit)
        run_config = {**(defaults or {}), **dict(context.run_config)}
        run_config = prepare_run_dir(run_config, context.run_id)
        options = ServerOptions.from_run_config(run_config)
        try:
            FederatedServer(options).run_rounds(grid)
        except BaseException as err:
            if isinstance(err, UserError):
                (options.run_dir / USER_ERROR_FILE).write_text(str(err))
            (options.run_dir / ERROR_FILE).write_text(traceback.format_exc())
            raise

    return app


_audited: set[str] = set()


def audit_opens(log_path: str) -> None:
    """Append `<pid>\t<mode>\t<path>` to `log_path` for every file this process opens
    from now on (Python's `open` audit event: `open()`, `os.open`, `Path.read_*`, ...).
    What the ServerApp does with `COTUNE_AUDIT_OPENS` set: an audit that it reads no
    training data. Idempotent per log."""
    if log_path in _audited:
        return
    _audited.add(log_path)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    pid = os.getpid()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            os.write(fd, f"{pid}\t{mode}\t{os.path.abspath(path)}\n".encode())

    sys.addaudithook(hook)


server_app = build_server_app()


# ----------------------------------------------------------------------------- client


@lru_cache(maxsize=4)
def _config(text: str) -> Config:
    from cotune.runtime.federated.server import config_from_text

    return config_from_text(text)


def _partition(context: Context, cfg: Config) -> int:
    node = context.node_config
    if PARTITION_KEY not in node:
        raise ValueError(
            f"this SuperNode has no {PARTITION_KEY!r} in its node config; start it with "
            f"--node-config '{PARTITION_KEY}=K {NUM_PARTITIONS_KEY}={cfg.federated.clients}'"
        )
    n = int(node.get(NUM_PARTITIONS_KEY, cfg.federated.clients))
    if n != cfg.federated.clients:
        raise ValueError(
            f"SuperNode has {NUM_PARTITIONS_KEY}={n} but federated.clients = "
            f"{cfg.federated.clients}; they must agree"
        )
    return int(node[PARTITION_KEY])


def _own_data(cfg: Config) -> bool:
    return cfg.federated.client_data == "node"


def node_data_path(context: Context, key: str = DATA_PATH_KEY) -> str:
    """The node's own data (`data-path`, or `eval-path` when `key` says so and it is
    set): a `UserError` when a node with its own data has none."""
    node = context.node_config
    if key == EVAL_PATH_KEY and EVAL_PATH_KEY in node:
        return str(node[EVAL_PATH_KEY])
    if DATA_PATH_KEY not in node or not str(node[DATA_PATH_KEY]).strip():
        raise UserError(
            f"this SuperNode has no {DATA_PATH_KEY!r} in its node config, and every node "
            f"brings its own training data: start it with --node-config "
            f"'{DATA_PATH_KEY}=\"/path/to/its/data\"' (a file or folder in the layout of "
            "the run's task)"
        )
    return str(node[DATA_PATH_KEY])


@lru_cache(maxsize=8)
def _node_config(text: str, data_path: str) -> Config:
    """The run's config with its task pointed at this node's own data."""
    from cotune.data.registry import with_data_path

    cfg = _config(text).model_copy(deep=True)
    cfg.task = with_data_path(cfg.task, data_path)
    return cfg


def _client_config(text: str, context: Context, key: str = DATA_PATH_KEY) -> Config:
    """The config a client trains (or evaluates) with: the run's, or with its own data
    the run's pointed at that data."""
    cfg = _config(text)
    return _node_config(text, node_data_path(context, key)) if _own_data(cfg) else cfg


def _describe_data(text: str, context: Context) -> ConfigRecord:
    """What this node's own data is (path, example count, fingerprint, class names),
    or why it cannot be used (a user error: no data-path, missing file, columns)."""
    from cotune.data.registry import fingerprint, labels_from_data
    from cotune.methods.federated.data import client_task

    path = str(context.node_config.get(DATA_PATH_KEY, ""))
    try:
        cfg = _client_config(text, context)
        task = client_task(cfg)
        info: dict[str, Any] = {
            DATA_PATH_KEY: path,
            EXAMPLES_KEY: len(task.train),
            SHA_KEY: fingerprint(task.train, task),
        }
        if labels_from_data(cfg.task) and task.label_names:
            info[LABELS_KEY] = list(task.label_names)
        if EVAL_PATH_KEY in context.node_config:  # checked now, not in the last round
            info[EVAL_PATH_KEY] = str(context.node_config[EVAL_PATH_KEY])
            client_task(_client_config(text, context, EVAL_PATH_KEY))
    except UserError as err:
        return ConfigRecord({DATA_PATH_KEY: path, ERROR_KEY: str(err)})
    return ConfigRecord(info)


def query(message: Message, context: Context) -> Message:
    """Start-up hand-shake: which partition this node holds (and, when the message
    carries the run's config and every node brings its own data, what its data is)."""
    node = context.node_config
    metrics = MetricRecord(
        {
            PARTITION_KEY: int(node.get(PARTITION_KEY, -1)),
            NUM_PARTITIONS_KEY: int(node.get(NUM_PARTITIONS_KEY, 0)),
        }
    )
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {METRICS_KEY: metrics}
    config = message.content.config_records.get(CONFIG_KEY)
    if config is not None and CONFIG_TEXT_KEY in config:
        text = str(config[CONFIG_TEXT_KEY])
        if _own_data(_config(text)):
            records[NODE_KEY] = _describe_data(text, context)
    return Message(RecordDict(records), reply_to=message)


def _client_id(config: ConfigRecord, context: Context, cfg: Config) -> int:
    """The client id: assigned by the server (nodes with their own data), else the
    node's partition."""
    if _own_data(cfg):
        return int(number(config[PARTITION_KEY], PARTITION_KEY))
    return _partition(context, cfg)


def train(message: Message, context: Context) -> Message:
    """One round of local training on this node's partition (or its own data)."""
    from cotune.methods.registry import federated_spec
    from cotune.runtime.federated.records import from_arrays, to_arrays

    content = message.content
    config = content.config_records[CONFIG_KEY]
    text = str(config[CONFIG_TEXT_KEY])
    cfg = _client_config(text, context)
    partition = _client_id(config, context, cfg)
    # ArrayRecords besides the global state: method-specific extras (fedpft's proxy)
    extras = {k: from_arrays(v) for k, v in content.array_records.items() if k != ARRAYS_KEY}
    state = from_arrays(content.array_records[ARRAYS_KEY])
    rnd = int(number(config["server-round"], "server-round"))
    t0 = time.perf_counter()
    update = federated_spec(cfg).client_train(cfg, partition, state, rnd, extras)
    train_s = time.perf_counter() - t0  # this client's local training, wall seconds
    metrics = MetricRecord(
        {WEIGHT_KEY: update.num_examples, PARTITION_KEY: partition, TRAIN_S_KEY: train_s,
         **update.metrics}
    )  # fmt: skip
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
        ARRAYS_KEY: to_arrays(update.state),
        METRICS_KEY: metrics,
    }
    records.update({k: to_arrays(v) for k, v in update.extras.items()})
    if _own_data(cfg):  # which data it trained on: the fingerprint of those examples
        from cotune.data.registry import fingerprint
        from cotune.methods.federated.data import client_examples, client_task

        sha = fingerprint(client_examples(cfg, partition), client_task(cfg))
        records[NODE_KEY] = ConfigRecord({SHA_KEY: sha})
    return Message(RecordDict(records), reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Score the global model on this node's own data (its `eval-path`, else its
    training data): the server has no evaluation data of its own."""
    from cotune.methods.registry import federated_spec
    from cotune.runtime.federated.records import from_arrays

    content = message.content
    config = content.config_records[CONFIG_KEY]
    text = str(config[CONFIG_TEXT_KEY])
    cfg = _client_config(text, context, EVAL_PATH_KEY)
    partition = _client_id(config, context, cfg)
    scorer = federated_spec(cfg).client_evaluate
    if scorer is None:
        raise ValueError(f"method {cfg.method!r} has no client-side evaluation")
    result = scorer(cfg, partition, from_arrays(content.array_records[ARRAYS_KEY]))
    on = EVAL_PATH_KEY if EVAL_PATH_KEY in context.node_config else DATA_PATH_KEY
    metrics = MetricRecord(
        {WEIGHT_KEY: result.num_examples, PARTITION_KEY: partition, **result.metrics}
    )
    return Message(
        RecordDict({METRICS_KEY: metrics, NODE_KEY: ConfigRecord({"scored-on": on})}),
        reply_to=message,
    )


def build_client_app(mods: Sequence[Mod] = (), outer: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; `mods` wrap its handlers (Flower mods: logging, fault
    injection), inside the standard ones, outermost first: `fault_mod` (fails only the
    train messages the server marked, `[federated.faults]`), `secagg_mod` (Flower's
    SecAgg+ on the messages of its stages) and `dp_clip_mod` (Flower's client-side
    clipping when the server asks for it). Each passes other messages through. `outer`
    mods wrap the standard ones and see every message first (a test's SecAgg+ dropout
    at a given stage)."""
    from cotune.runtime.federated.client_mods import dp_clip_mod, secagg_mod
    from cotune.runtime.federated.faults import fault_mod

    app = ClientApp(mods=[*outer, fault_mod, secagg_mod, dp_clip_mod, *mods])
    app.query()(query)
    app.train()(train)
    app.evaluate()(evaluate)
    return app


client_app = build_client_app()
