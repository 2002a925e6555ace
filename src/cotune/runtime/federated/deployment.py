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
import logging
from pathlib import Path

from cotune.config import Config
from cotune.report import progress
from cotune.runtime.federated.credentials import KeyFolder, add_node, init_keys
from cotune.runtime.federated.flower_cli import (
    CONNECTION,
    FLWR_HOME_DIR,
    flower_env,
    register_node,
    submit,
    unregister_node,
    wait_for_result,
    write_connection,
)
from cotune.runtime.federated.keys import NUM_PARTITIONS_KEY, PARTITION_KEY, NodeConfig
from cotune.runtime.federated.server import ServerOptions
from cotune.runtime.launcher import LOOPBACK, Child, console_script, free_port, stop_all

log = logging.getLogger(__name__)

__all__ = ["CONNECTION", "LocalFederation", "flower_env", "node_config_arg", "run_in_deployment"]

KEYS_DIR = "keys"
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

    Secure unless `insecure`: a CA, a SuperLink certificate and a key pair per node are
    made in `workdir/keys` (`cotune.runtime.federated.credentials`); the SuperLink serves
    TLS with SuperNode authentication on, node i's public key (`node-i`) is registered
    with `flwr supernode register` before it starts, and every SuperNode verifies the
    SuperLink against the CA and signs its requests with its own key. `add_node` starts a
    further node (registered or not), `revoke` unregisters one.

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
        *,
        insecure: bool = False,
    ) -> None:
        if node_configs is not None and len(node_configs) != n_nodes:
            raise ValueError(f"{len(node_configs)} node configs for {n_nodes} SuperNodes")
        self.workdir = workdir
        self.n_nodes = n_nodes
        self.log_dir = log_dir or workdir
        self.flwr_home = workdir / FLWR_HOME_DIR
        self.insecure = insecure
        self.keys: KeyFolder | None = None
        self.port = 0
        self.children: list[Child] = []
        self.essential: list[Child] = []  # the SuperLink and the registered nodes
        self.nodes: dict[str, Child] = {}
        self.node_ids: dict[str, int] = {}  # registered name -> Flower node id
        self.node_configs: list[NodeConfig] = node_configs or [
            {PARTITION_KEY: i, NUM_PARTITIONS_KEY: n_nodes} for i in range(n_nodes)
        ]

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def root_certificates(self) -> str | None:
        return None if self.keys is None else str(self.keys.ca_cert)

    def _spawn(self, args: list[str], log_name: str) -> Child:
        child = Child(args, self.log_dir / log_name, env=flower_env(self.flwr_home))
        self.children.append(child)
        return child

    def start(self) -> LocalFederation:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.insecure:
            tls = ["--insecure"]
        else:
            self.keys = init_keys(self.workdir / KEYS_DIR, force=True)
            tls = ["--ssl-ca-certfile", str(self.keys.ca_cert),
                   "--ssl-certfile", str(self.keys.server_cert),
                   "--ssl-keyfile", str(self.keys.server_key), "--enable-supernode-auth"]  # fmt: skip
        link = self._spawn(
            [console_script("flower-superlink"), *tls, "--host", LOOPBACK,
             "--port", str(self.port), "--disable-runtime-dependency-installation"],
            "superlink.log",
        )  # fmt: skip
        self.essential.append(link)
        link.wait_for_port(LOOPBACK, self.port, START_TIMEOUT, "the Flower SuperLink")
        write_connection(self.flwr_home, self.address, self.root_certificates, self.insecure)
        for i in range(self.n_nodes):
            self.add_node(f"node-{i}", self.node_configs[i], log_name=f"supernode-{i}.log")
        return self

    def add_node(
        self, name: str, node_config: NodeConfig, *, register: bool = True, log_name: str = ""
    ) -> Child:
        """Start SuperNode `name` (secure: with its key pair, made if it has none yet,
        registered first unless `register` is False, e.g. a node the SuperLink must
        refuse, or one restarted after `revoke`)."""
        auth: list[str] = ["--insecure"]
        if self.keys is not None:
            private, public = self.keys.node_key(name), self.keys.node_pub(name)
            if not private.exists():
                add_node(self.keys, name)
            if register:
                self.node_ids[name] = register_node(self.flwr_home, public)
            auth = ["--root-certificates", str(self.keys.ca_cert),
                    "--auth-supernode-private-key", str(private)]  # fmt: skip
        child = self._spawn(
            [console_script("flower-supernode"), *auth, "--superlink", self.address,
             "--host", LOOPBACK, "--port", str(free_port()),
             "--node-config", node_config_arg(node_config)],
            log_name or f"supernode-{name}.log",
        )  # fmt: skip
        self.nodes[name] = child
        if register:
            self.essential.append(child)
        return child

    def revoke(self, name: str) -> None:
        """Unregister node `name` from the SuperLink: it is cut off and cannot rejoin."""
        unregister_node(self.flwr_home, self.node_ids.pop(name))
        child = self.nodes[name]
        if child in self.essential:
            self.essential.remove(child)

    def alive(self) -> bool:
        """The SuperLink and every registered node still run (a refused or revoked node
        exiting is not a problem)."""
        return all(c.alive() for c in self.essential)

    def problem(self) -> str | None:
        """Why the run cannot end well (a process of the federation died), or None."""
        if self.alive():
            return None
        return f"a SuperLink/SuperNode process exited early; see the logs in {self.log_dir}"

    def stop(self) -> None:
        """Stop the processes this federation started and everything they spawned."""
        stop_all(self.children, grace=STOP_TIMEOUT)
        self.children.clear()
        self.essential.clear()

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
        if cfg.runtime.insecure:
            log.warning("runtime.insecure: submitting to %s without TLS", cfg.runtime.superlink)
        write_connection(flwr_home, cfg.runtime.superlink, cfg.runtime.tls_ca, cfg.runtime.insecure)
        submit(flwr_home, options)
        wait_for_result(run_dir, timeout, echo=progress.echo(cfg.federated.rounds))
        return
    if cfg.runtime.insecure:
        log.warning(
            "runtime.insecure: the loopback SuperLink runs without TLS and without "
            "SuperNode authentication"
        )
    fed = LocalFederation(
        run_dir / "federation", cfg.federated.clients, run_dir / "logs",
        insecure=cfg.runtime.insecure,
    )  # fmt: skip
    with fed:
        submit(fed.flwr_home, options)
        wait_for_result(run_dir, timeout, fed.problem, progress.echo(cfg.federated.rounds))
