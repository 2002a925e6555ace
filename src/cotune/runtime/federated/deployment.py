"""The deployment engine: a SuperLink, SuperNodes and `flwr run`.

`cotune run` with `runtime.engine = "deployment"` submits cotune's Flower App
(`cotune.flower_app`, whose components are cotune's ServerApp and ClientApp) with
`flwr run`, the run folder as its run config, either

- to a SuperLink the user started (`runtime.superlink = "host:port"`), with SuperNodes
  on the devices (see docs/federated.md for the commands), or
- to a `LocalFederation` it starts itself: one SuperLink and `federated.clients`
  SuperNodes on 127.0.0.1, stopped again when the run ends.

The ServerApp runs in a `flwr-serverapp` process next to the SuperLink and writes the
run folder; this side waits (bounded) for its result file.
"""

from __future__ import annotations

import json
from pathlib import Path

from cotune.config import Config
from cotune.report import progress
from cotune.runtime.federated.flower_cli import (
    FLWR_HOME_DIR,
    flower_env,
    submit,
    wait_for_result,
    write_connection,
)
from cotune.runtime.federated.keys import NUM_PARTITIONS_KEY, PARTITION_KEY, NodeConfig
from cotune.runtime.federated.server import ServerOptions
from cotune.runtime.launcher import LOOPBACK, Child, console_script, free_port, stop_all

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def node_config_arg(config: NodeConfig) -> str:
    """`--node-config` text: space-separated `key=value` with TOML values (strings
    quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


class LocalFederation:
    """A SuperLink and `n_nodes` SuperNodes on 127.0.0.1: node i holds partition-id i,
    or, given `node_configs`, has node config `node_configs[i]` (e.g. its own
    `data-path`, to try deployment with every node's own data on one machine).

    Each is a `Child` of the runtime's launcher, so stopping the federation (SIGTERM, then
    SIGKILL after a grace period) also stops the ServerApp/ClientApp processes they
    spawned.
    """

    def __init__(
        self,
        workdir: Path,
        n_nodes: int,
        log_dir: Path | None = None,
        node_configs: list[NodeConfig] | None = None,
    ) -> None:
        if node_configs is not None and len(node_configs) != n_nodes:
            raise ValueError(f"{len(node_configs)} node configs for {n_nodes} SuperNodes")
        self.workdir = workdir
        self.n_nodes = n_nodes
        self.log_dir = log_dir or workdir
        self.flwr_home = workdir / FLWR_HOME_DIR
        self.port = 0
        self.children: list[Child] = []
        self.node_configs: list[NodeConfig] = node_configs or [
            {PARTITION_KEY: i, NUM_PARTITIONS_KEY: n_nodes} for i in range(n_nodes)
        ]

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _spawn(self, args: list[str], log_name: str) -> Child:
        child = Child(args, self.log_dir / log_name, env=flower_env(self.flwr_home))
        self.children.append(child)
        return child

    def start(self) -> LocalFederation:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        link = self._spawn(
            [console_script("flower-superlink"), "--insecure", "--host", LOOPBACK,
             "--port", str(self.port), "--disable-runtime-dependency-installation"],
            "superlink.log",
        )  # fmt: skip
        link.wait_for_port(LOOPBACK, self.port, START_TIMEOUT, "the Flower SuperLink")
        for i in range(self.n_nodes):
            self._spawn(
                [console_script("flower-supernode"), "--insecure", "--superlink", self.address,
                 "--host", LOOPBACK, "--port", str(free_port()),
                 "--node-config", node_config_arg(self.node_configs[i])],
                f"supernode-{i}.log",
            )  # fmt: skip
        return self

    def alive(self) -> bool:
        return all(c.alive() for c in self.children)

    def problem(self) -> str | None:
        """Why the run cannot end well (a process of the federation died), or None."""
        if self.alive():
            return None
        return f"a SuperLink/SuperNode process exited early; see the logs in {self.log_dir}"

    def stop(self) -> None:
        """Stop the processes this federation started and everything they spawned."""
        stop_all(self.children, grace=STOP_TIMEOUT)
        self.children.clear()

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_in_deployment(cfg: Config, options: ServerOptions, timeout: float | None = None) -> None:
    """Submit the run to `runtime.superlink`, or to a loopback federation started here;
    return when the ServerApp has written its result (or raise)."""
    run_dir = options.run_dir
    if cfg.runtime.superlink:
        flwr_home = run_dir / FLWR_HOME_DIR
        write_connection(flwr_home, cfg.runtime.superlink, cfg.runtime.tls_ca)
        submit(flwr_home, options)
        wait_for_result(run_dir, timeout, echo=progress.echo(cfg.federated.rounds))
        return
    with LocalFederation(run_dir / "federation", cfg.federated.clients, run_dir / "logs") as fed:
        write_connection(fed.flwr_home, fed.address)
        submit(fed.flwr_home, options)
        wait_for_result(run_dir, timeout, fed.problem, progress.echo(cfg.federated.rounds))
