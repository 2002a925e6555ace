"""The Flower apps that run every federated method (`FederatedSpec`): the ServerApp runs
the rounds with the method's server hook, the ClientApp calls the method's
`client_train`. The same two objects serve both engines:

- simulation: `cotune run` passes them to `flwr.simulation.run_simulation`;
- deployment: a SuperLink loads them from the Flower App in the run folder
  (`[tool.flwr.app.components]` points at `cotune.runtime.federated.apps:server_app`
  and `:client_app`), the SuperNodes run the ClientApp next to each device's data.

The ServerApp reads its run folder from the run config (`run-dir`); the ClientApp
gets the experiment config inside every train message and its partition from the
SuperNode's node config (`partition-id`, `num-partitions`).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp

from cotune.runtime.federated.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    CONFIG_TEXT_KEY,
    ERROR_FILE,
    METRICS_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_KEY,
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
        from cotune.runtime.federated.server import FederatedServer, ServerOptions

        options = ServerOptions.from_run_config({**(defaults or {}), **dict(context.run_config)})
        try:
            FederatedServer(options).run_rounds(grid)
        except BaseException:
            (options.run_dir / ERROR_FILE).write_text(traceback.format_exc())
            raise

    return app


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


def query(message: Message, context: Context) -> Message:
    """Start-up hand-shake: which partition this node holds."""
    node = context.node_config
    metrics = MetricRecord(
        {
            PARTITION_KEY: int(node.get(PARTITION_KEY, -1)),
            NUM_PARTITIONS_KEY: int(node.get(NUM_PARTITIONS_KEY, 0)),
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)


def train(message: Message, context: Context) -> Message:
    """One round of local training on this node's partition."""
    from cotune.methods.registry import federated_spec
    from cotune.runtime.federated.records import from_arrays, to_arrays

    content = message.content
    config = content.config_records[CONFIG_KEY]
    cfg = _config(str(config[CONFIG_TEXT_KEY]))
    partition = _partition(context, cfg)
    # ArrayRecords besides the global state: method-specific extras (fedpft's proxy)
    extras = {k: from_arrays(v) for k, v in content.array_records.items() if k != ARRAYS_KEY}
    state = from_arrays(content.array_records[ARRAYS_KEY])
    rnd = int(number(config["server-round"], "server-round"))
    update = federated_spec(cfg).client_train(cfg, partition, state, rnd, extras)
    metrics = MetricRecord(
        {WEIGHT_KEY: update.num_examples, PARTITION_KEY: partition, **update.metrics}
    )
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
        ARRAYS_KEY: to_arrays(update.state),
        METRICS_KEY: metrics,
    }
    records.update({k: to_arrays(v) for k, v in update.extras.items()})
    return Message(RecordDict(records), reply_to=message)


def build_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; `mods` wrap its handlers (Flower mods: logging, DP, fault injection)."""
    app = ClientApp(mods=list(mods))
    app.query()(query)
    app.train()(train)
    return app


client_app = build_client_app()
