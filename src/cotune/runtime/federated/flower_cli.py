"""Submitting cotune's Flower App with the `flwr` CLI, as every engine but inline does.

`submit` runs `flwr run APP_DIR cotune --run-config ...` (plus `--federation-config`
for a simulation SuperLink) against the SuperLink connection `write_connection` put
into a private Flower home; `wait_for_result` then waits, bounded, for the ServerApp
(which runs next to the SuperLink) to write its result file into the run folder.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cotune
from cotune.runtime.federated.keys import ERROR_FILE, RESULT_FILE, raise_server_error
from cotune.runtime.federated.server import ServerOptions
from cotune.runtime.launcher import child_env, console_script

# the Flower App `cotune run` submits: `cotune.flower_app`'s bundled pyproject.toml
# (a path, not an import: the App's package sits above the runtime)
APP_DIR = Path(cotune.__file__).resolve().parent / "flower_app" / "app"
FLWR_HOME_DIR = "flwr-home"
CONNECTION = "cotune"
SUBMIT_TIMEOUT = 120.0


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes (they spawn `flower-superexec`,
    `flwr-serverapp`, `flwr-simulation` ... from this venv's scripts)."""
    return child_env({"FLWR_HOME": str(flwr_home)})


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


def _flwr(flwr_home: Path, *args: str) -> dict[str, object]:
    """A `flwr ... --format json` command against the connection in `flwr_home`."""
    proc = subprocess.run(
        [console_script("flwr"), *args, CONNECTION, "--format", "json"],
        env=flower_env(flwr_home), capture_output=True, text=True, timeout=SUBMIT_TIMEOUT,
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
    """Unregister a SuperNode: the SuperLink refuses it from then on."""
    _flwr(flwr_home, "supernode", "unregister", str(node_id))


def pairs(values: dict[str, Any]) -> str:
    """`key=value ...` with TOML values (strings quoted), as `flwr run` options take."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def submit(
    flwr_home: Path,
    options: ServerOptions,
    federation_config: dict[str, Any] | None = None,
    app_dir: Path = APP_DIR,
) -> str:
    """`flwr run APP_DIR cotune --run-config ...`; returns the CLI's output."""
    args = [console_script("flwr"), "run", str(app_dir), CONNECTION,
            "--run-config", pairs(options.to_run_config())]  # fmt: skip
    if federation_config:
        args += ["--federation-config", pairs(federation_config)]
    proc = subprocess.run(
        args,
        env=flower_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=SUBMIT_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0 or "Successfully started run" not in proc.stdout:
        raise RuntimeError(f"flwr run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


class RoundEcho:
    """Passes each new record of the run folder's metrics.jsonl (one per round, written
    by the ServerApp in another process) to `echo`: `cotune run`'s progress lines."""

    def __init__(self, run_dir: Path, echo: Callable[[dict[str, Any]], None] | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.echo = echo
        # a resumed run's earlier rounds are not news
        self.last = max((int(r.get("round", 0)) for r in self._records()), default=0)

    def _records(self) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
        return out

    def __call__(self) -> None:
        if self.echo is None:
            return
        for record in self._records():
            if int(record.get("round", 0)) > self.last:
                self.last = int(record.get("round", 0))
                self.echo(record)


def wait_for_result(
    run_dir: Path,
    timeout: float | None,
    alive: Callable[[], str | None] | None = None,
    echo: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Until the ServerApp's result file is in `run_dir`: its error as an exception if
    it failed, a RuntimeError if `alive()` reports (a message) that a process of the
    run has died, a TimeoutError after `timeout` seconds (None: no bound). Each new
    round of metrics.jsonl goes to `echo` meanwhile."""
    deadline = None if timeout is None else time.monotonic() + timeout
    rounds = RoundEcho(run_dir, echo)
    while not (run_dir / RESULT_FILE).exists():
        rounds()
        if (run_dir / ERROR_FILE).exists():
            raise_server_error(run_dir)
        problem = alive() if alive is not None else None
        if problem:
            raise RuntimeError(problem)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no result in {run_dir} after {timeout:.0f} s")
        time.sleep(0.5)
    rounds()
