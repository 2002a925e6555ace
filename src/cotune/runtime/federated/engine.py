"""Running a federated method (`FederatedSpec`) on the engine its config names.

`run_federated` starts the Flower engine (simulation or deployment: cotune's Flower App
submitted with `flwr run`; "inline" for tests), which runs cotune's ServerApp and
ClientApp, then reads what the ServerApp wrote into the run folder. The ServerApp
writes the run's metrics.jsonl and train.jsonl itself (it runs in another process,
next to the SuperLink).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from cotune.config import Config, to_toml
from cotune.errors import ConfigError
from cotune.methods import MethodResult, resolve
from cotune.runtime.federated.keys import (
    ERROR_FILE,
    RESULT_FILE,
    USER_ERROR_FILE,
    NodeConfig,
    raise_server_error,
)
from cotune.runtime.federated.server import ServerOptions


def run_federated(
    cfg: Config,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    stop_after: int = 0,
    client_app: ClientApp | None = None,
    deployment_timeout: float | None = None,
    engine: str | None = None,
    node_configs: list[NodeConfig] | None = None,
) -> MethodResult:
    """Run `cfg` (a federated method) to the end, or to round `stop_after`.

    With `resume`, the ServerApp continues from the run folder's checkpoint. A
    `client_app` replaces the standard ClientApp on the inline engine (tests wrap it
    with mods). `deployment_timeout` bounds the wait for the result of a run submitted
    with `flwr run` (None: no bound). `engine` overrides `runtime.engine`; "inline" runs the clients in this
    process without Ray (`inline.py`, for tests and debugging), each with its
    `node_configs` entry as node config when given (nodes with their own `data-path`).
    """
    resolve(cfg)
    engine = engine or cfg.runtime.engine
    check_client_data(cfg, engine, node_configs)
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="cotune-fed-") as tmp:
            return run_federated(
                cfg, tmp, resume=resume, stop_after=stop_after, client_app=client_app,
                deployment_timeout=deployment_timeout, engine=engine, node_configs=node_configs,
            )  # fmt: skip
    run_path = Path(run_dir).resolve()
    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "config.toml").write_text(to_toml(cfg))
    for name in (RESULT_FILE, ERROR_FILE, USER_ERROR_FILE):
        (run_path / name).unlink(missing_ok=True)
    options = ServerOptions(run_dir=run_path, resume=resume, stop_after=stop_after)
    if engine != "inline" and client_app is not None:
        raise ValueError(
            f"a custom client_app runs on the inline engine only; the {engine} engine "
            "submits cotune's Flower App (use [federated.faults] to inject failures)"
        )
    if engine == "simulation":
        from cotune.runtime.federated.simulation import run_in_simulation

        run_in_simulation(cfg, options, timeout=deployment_timeout)
    elif engine == "inline":
        from cotune.runtime.federated.inline import run_inline

        run_inline(cfg, options, client_app, node_configs)
    else:
        from cotune.runtime.federated.deployment import run_in_deployment

        run_in_deployment(cfg, options, timeout=deployment_timeout)
    return to_method_result(engine, read_result(run_path))


def check_client_data(cfg: Config, engine: str, node_configs: list[NodeConfig] | None) -> None:
    """Clients with their own data (`federated.client_data = "node"`) need nodes that
    have it: SuperNodes of the user's SuperLink, or inline nodes given `node_configs`."""
    if cfg.federated.client_data != "node":
        if node_configs is not None:
            raise ConfigError("node configs are for federated.client_data = 'node'")
        return
    if engine == "simulation" or (engine == "deployment" and not cfg.runtime.superlink):
        raise ConfigError(
            "federated.client_data = 'node' (each client trains on its own data) runs on "
            "SuperNodes started with their data: flower-supernode ... --node-config "
            "'data-path=\"/path/to/data\"', on a SuperLink given as runtime.superlink "
            f"(runtime.engine = 'deployment'); the {engine} engine here partitions the "
            "task's data instead: remove federated.client_data"
        )
    if engine == "inline" and node_configs is None:
        raise ConfigError(
            "the inline engine with federated.client_data = 'node' needs node_configs"
        )


def read_result(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESULT_FILE
    if not path.exists():
        raise_server_error(run_dir)
    return json.loads(path.read_text())


def to_method_result(engine: str, result: dict[str, Any]) -> MethodResult:
    rounds = max(int(result["rounds_completed"]), 1)
    # the inline engine trains every client in the server's process: the peak a client
    # step measured is that process's (the server's model, proxy and data included), not
    # a device's, so it is kept apart and no device peak is reported
    peak = result.get("client_peak_rss_bytes")
    inline = engine == "inline"
    return MethodResult(
        metrics=dict(result["metrics"]),
        bytes_up=int(result["bytes_up"]),
        bytes_down=int(result["bytes_down"]),
        device_peak_bytes=None if inline else peak,
        saved_activation_bytes=result.get("client_saved_activation_bytes"),
        trainable_device=int(result["trainable_device"]),
        trainable_cloud=int(result["trainable_cloud"]),
        extra={
            "engine": engine,
            "rounds": int(result["rounds"]),
            "rounds_completed": int(result["rounds_completed"]),
            "bytes_per_round": (int(result["bytes_up"]) + int(result["bytes_down"])) / rounds,
            "server_peak_rss_bytes": result.get("server_peak_rss_bytes"),
            **({"inline_process_peak_bytes": peak} if inline else {}),
            "device_weight_bytes": result.get("device_weight_bytes"),
            "client_bytes": result.get("client_bytes"),
            "federated_wall_s": result.get("wall_s"),
            **({"network": result["network"]} if result.get("network") else {}),
            "client_data": result.get("client_data", "partition"),
            "evaluated_on": result.get("evaluated_on", "server"),
            **{k: result[k] for k in ("privacy", "secure_aggregation") if k in result},
        },
    )
