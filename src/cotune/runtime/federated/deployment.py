"""The deployment engine: a SuperLink, SuperNodes and `flwr run`.

`cotune run` with `runtime.engine = "deployment"` writes a Flower App into the run
folder (a pyproject.toml whose components are cotune's ServerApp and ClientApp) and
submits it with `flwr run`, either

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
import subprocess
import time
from pathlib import Path

from cotune.config import Config
from cotune.runtime.federated.credentials import KeyFolder, add_node, init_keys
from cotune.runtime.federated.keys import (
    ERROR_FILE,
    NUM_PARTITIONS_KEY,
    PARTITION_KEY,
    RESULT_FILE,
    NodeConfig,
    raise_server_error,
)
from cotune.runtime.federated.server import ServerOptions
from cotune.runtime.launcher import LOOPBACK, Child, child_env, console_script, free_port, stop_all

log = logging.getLogger(__name__)

APP_DIR = "flower-app"
FLWR_HOME_DIR = "flwr-home"
KEYS_DIR = "keys"
CONNECTION = "cotune"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes (they spawn `flower-superexec`,
    `flwr-serverapp`, ... from this venv's scripts)."""
    return child_env({"FLWR_HOME": str(flwr_home)})


def write_flower_app(app_dir: Path, options: ServerOptions) -> Path:
    """A Flower App whose components are cotune's apps; its default run config points
    the ServerApp at the run folder."""
    from cotune import __version__

    app_dir.mkdir(parents=True, exist_ok=True)
    config = options.to_run_config()
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "cotune-federated"',
        f'version = "{__version__}"',
        'description = "cotune federated fine-tuning on Flower"',
        'license = "Apache-2.0"',
        "dependencies = []  # cotune must be installed on the SuperLink and every SuperNode",
        "",
        "[tool.flwr.app]",
        'publisher = "cotune"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "cotune.runtime.federated.apps:server_app"',
        'clientapp = "cotune.runtime.federated.apps:client_app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {json.dumps(v)}" for k, v in config.items()),
        "",
    ]
    (app_dir / "pyproject.toml").write_text("\n".join(lines))
    return app_dir


def write_connection(
    flwr_home: Path, address: str, root_certificates: str | None = None, insecure: bool = False
) -> None:
    """The Flower CLI config naming the SuperLink `flwr run` submits to: TLS verified
    against `root_certificates` (a PEM file) when given, else against the system's
    roots; plain only when `insecure`."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f"address = {json.dumps(address)}")
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


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
        return all(c.alive() for c in self.essential)

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


def _flwr(flwr_home: Path, *args: str) -> dict[str, object]:
    """A `flwr ... --format json` command against the connection in `flwr_home`."""
    proc = subprocess.run(
        [console_script("flwr"), *args, CONNECTION, "--format", "json"],
        env=flower_env(flwr_home), capture_output=True, text=True, timeout=START_TIMEOUT,
        check=False,
    )  # fmt: skip
    try:
        answer = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success"):
        raise RuntimeError(f"flwr {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return dict(answer)


def register_node(flwr_home: Path, public_key: Path) -> int:
    """Register a SuperNode's public key with the SuperLink; its Flower node id."""
    return int(str(_flwr(flwr_home, "supernode", "register", str(public_key))["node-id"]))


def unregister_node(flwr_home: Path, node_id: int) -> None:
    _flwr(flwr_home, "supernode", "unregister", str(node_id))


def submit(app_dir: Path, flwr_home: Path, options: ServerOptions) -> str:
    """`flwr run APP_DIR cotune --run-config ...`; returns the CLI's output."""
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in options.to_run_config().items())
    proc = subprocess.run(
        [console_script("flwr"), "run", str(app_dir), CONNECTION, "--run-config", overrides],
        env=flower_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT * 2,
        check=False,
    )
    if proc.returncode != 0 or "Successfully started run" not in proc.stdout:
        raise RuntimeError(f"flwr run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def wait_for_result(
    run_dir: Path, timeout: float | None, federation: LocalFederation | None = None
) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while not (run_dir / RESULT_FILE).exists():
        if (run_dir / ERROR_FILE).exists():
            raise_server_error(run_dir)
        if federation is not None and not federation.alive():
            raise RuntimeError(
                f"a SuperLink/SuperNode process exited early; see the logs in {federation.log_dir}"
            )
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no result in {run_dir} after {timeout:.0f} s")
        time.sleep(0.5)


def run_in_deployment(cfg: Config, options: ServerOptions, timeout: float | None = None) -> None:
    """Submit the run to `runtime.superlink`, or to a loopback federation started here;
    return when the ServerApp has written its result (or raise)."""
    run_dir = options.run_dir
    app_dir = write_flower_app(run_dir / APP_DIR, options)
    if cfg.runtime.superlink:
        flwr_home = run_dir / FLWR_HOME_DIR
        if cfg.runtime.insecure:
            log.warning("runtime.insecure: submitting to %s without TLS", cfg.runtime.superlink)
        write_connection(flwr_home, cfg.runtime.superlink, cfg.runtime.tls_ca, cfg.runtime.insecure)
        submit(app_dir, flwr_home, options)
        wait_for_result(run_dir, timeout)
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
        submit(app_dir, fed.flwr_home, options)
        wait_for_result(run_dir, timeout, fed)
