"""The simulation engine: Flower's `run_simulation` (Ray) with one virtual SuperNode
per client, a bounded number of them training at once."""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.clientapp import ClientApp

from cotune.config import Config
from cotune.runtime.federated.server import ServerOptions

OBJECT_STORE_BYTES = 1 << 30  # Ray's shared-memory store; messages pass through it


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def parallel_clients(cfg: Config) -> int:
    """Clients training at once: `runtime.parallel_clients`, else one per CPU core."""
    wanted = cfg.runtime.parallel_clients or os.cpu_count() or 1
    return max(1, min(wanted, cfg.federated.clients))


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray resources: each ClientApp takes one CPU (so torch runs one thread in it)."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": parallel_clients(cfg),
            "num_gpus": 0,
            "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False,
        },
    }


def run_in_simulation(
    cfg: Config, options: ServerOptions, client_app: ClientApp | None = None
) -> None:
    """Run the ServerApp in this process and `cfg.federated.clients` virtual SuperNodes
    in Ray actors until the ServerApp returns."""
    from flwr.simulation import run_simulation

    from cotune.runtime.federated.apps import build_server_app
    from cotune.runtime.federated.apps import client_app as default_client_app

    flwr_log = logging.getLogger("flwr")
    drop = _DropDeprecation()
    flwr_log.addFilter(drop)
    level = flwr_log.level
    if not os.environ.get("COTUNE_FLOWER_VERBOSE"):
        flwr_log.setLevel(logging.WARNING)
    try:
        run_simulation(
            server_app=build_server_app(options.to_run_config()),
            client_app=client_app or default_client_app,
            num_supernodes=cfg.federated.clients,
            backend_config=backend_config(cfg),
        )
    finally:
        flwr_log.removeFilter(drop)
        flwr_log.setLevel(level)
