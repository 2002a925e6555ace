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
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cotune.config import Config
from cotune.runtime.federated.keys import ERROR_FILE, RESULT_FILE
from cotune.runtime.federated.server import ServerOptions

APP_DIR = "flower-app"
FLWR_HOME_DIR = "flwr-home"
CONNECTION = "cotune"
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def _bin(name: str) -> str:
    """A console script of the running interpreter's environment."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes: this venv's scripts first on PATH (the
    SuperLink and SuperNodes spawn `flower-superexec`, `flwr-serverapp`, ...)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{path}" if path else bin_dir,
        "FLWR_HOME": str(flwr_home),
        "PYTHONUNBUFFERED": "1",
    }


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Flower detaches some children into their own
    sessions, so a process group does not hold them all)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


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
        'description = "cotune federated fine-tuning (fedavg, fedlora, fedkd) on Flower"',
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


def write_connection(flwr_home: Path, address: str, root_certificates: str | None = None) -> None:
    """The Flower CLI config naming the SuperLink `flwr run` submits to: TLS verified
    against `root_certificates` (a PEM file) when given, plain otherwise."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f"address = {json.dumps(address)}")
    if root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    else:
        lines.append("insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


class LocalFederation:
    """A SuperLink and `n_nodes` SuperNodes (partition-id 0..n-1) on 127.0.0.1.

    Each process starts in its own session, so stopping it (SIGTERM, then SIGKILL
    after a grace period) also stops the ServerApp/ClientApp processes it spawned.
    """

    def __init__(self, workdir: Path, n_nodes: int, log_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.n_nodes = n_nodes
        self.log_dir = log_dir or workdir
        self.flwr_home = workdir / FLWR_HOME_DIR
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / log_name).open("ab") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def start(self) -> LocalFederation:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._spawn(
            [_bin("flower-superlink"), "--insecure", "--host", LOOPBACK, "--port", str(self.port),
             "--disable-runtime-dependency-installation"],
            "superlink.log",
        )  # fmt: skip
        wait_for_port(LOOPBACK, self.port, START_TIMEOUT)
        for i in range(self.n_nodes):
            self._spawn(
                [_bin("flower-supernode"), "--insecure", "--superlink", self.address,
                 "--host", LOOPBACK, "--port", str(free_port()),
                 "--node-config", f"partition-id={i} num-partitions={self.n_nodes}"],
                f"supernode-{i}.log",
            )  # fmt: skip
        return self

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        """Stop the processes this federation started and everything they spawned."""
        tree = [pid for p in self.procs if p.poll() is None for pid in [p.pid, *descendants(p.pid)]]
        tree += [pid for p in self.procs for pid in descendants(p.pid) if pid not in tree]
        _signal(list(reversed(tree)), signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.2)
        _signal([p for p in tree if _alive(p)], signal.SIGKILL)
        self.procs.clear()

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def submit(app_dir: Path, flwr_home: Path, options: ServerOptions) -> str:
    """`flwr run APP_DIR cotune --run-config ...`; returns the CLI's output."""
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in options.to_run_config().items())
    proc = subprocess.run(
        [_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", overrides],
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
            raise RuntimeError(f"the ServerApp failed:\n{(run_dir / ERROR_FILE).read_text()}")
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
        write_connection(flwr_home, cfg.runtime.superlink, cfg.runtime.tls_ca)
        submit(app_dir, flwr_home, options)
        wait_for_result(run_dir, timeout)
        return
    with LocalFederation(run_dir / "federation", cfg.federated.clients, run_dir / "logs") as fed:
        write_connection(fed.flwr_home, fed.address)
        submit(app_dir, fed.flwr_home, options)
        wait_for_result(run_dir, timeout, fed)
