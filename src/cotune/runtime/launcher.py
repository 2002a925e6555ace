"""Starting and stopping the child processes of a run: one launcher for every engine.

`Child` is a process the runtime started: a `cotune cloud` on loopback, one `cotune
device` per splitfed device, a Flower SuperLink or SuperNode. Each writes to its own
log file, starts within a bounded time (`wait_for_file` / `wait_for_port`, failing
early with the log's tail if the process dies), and stops with SIGTERM, then SIGKILL
after a grace period, together with every process it spawned. Children inherit this
process's environment, so the user's hub choice (`cotune --offline`, HF_HUB_OFFLINE)
holds in every process of a run (`cotune.hub` is the policy).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cotune.errors import UserError

LOOPBACK = "127.0.0.1"
# What every cotune process runs with (a variable the user already set wins). The hub
# policy is not here: it is the user's (`cotune.hub`), and children inherit it.
PROCESS_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    # no "Loading weights" bars (transformers reads this when imported); cotune shows its own
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "FLWR_TELEMETRY_ENABLED": "0",  # Flower reports usage events to its servers otherwise
}


def process_env() -> None:
    """This process: quiet tokenizers and hub downloads, no telemetry (a variable
    already set wins). Whether the hub may be used is `cotune.hub`'s policy."""
    for key, value in PROCESS_ENV.items():
        os.environ.setdefault(key, value)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: this one (with the user's hub choice: `--offline`
    sets COTUNE_OFFLINE and HF_HUB_OFFLINE here, so children inherit it), this
    interpreter's scripts first on PATH (Flower's processes spawn further console
    scripts)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {
        **PROCESS_ENV,
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{path}" if path else bin_dir,
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


def cotune_command(*args: str) -> list[str]:
    """`python -m cotune ARGS` with this interpreter."""
    return [sys.executable, "-m", "cotune", *args]


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (e.g. `flwr`)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


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


def _signal(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Child:
    """One child process with its log file (appended to), in its own session."""

    def __init__(
        self, args: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=env or child_env(),
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL now (tests use it to simulate a crash)."""
        self.proc.send_signal(signal.SIGKILL)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _fail(self, what: str, why: str) -> UserError:
        return UserError(f"{what} {why}; the end of its log ({self.log_path}):\n{self.tail()}")

    def wait_for_file(self, path: Path, timeout: float, what: str) -> str:
        """The content of `path` once this process has written it (e.g. the port it
        listens on); a `UserError` if it exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.alive():
                raise self._fail(what, f"exited with status {self.returncode}")
            if time.monotonic() > deadline:
                raise self._fail(what, f"did not start within {timeout:.0f} s")
            time.sleep(0.05)
        return path.read_text()

    def wait_for_port(self, host: str, port: int, timeout: float, what: str) -> None:
        """Until `host:port` accepts connections (bounded like `wait_for_file`)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return
            except OSError:
                if not self.alive():
                    raise self._fail(what, f"exited with status {self.returncode}") from None
                if time.monotonic() > deadline:
                    raise self._fail(what, f"does not listen on {host}:{port}") from None
                time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)


def stop_all(children: Sequence[Child], grace: float = 10.0) -> None:
    """SIGTERM every child and everything it spawned, wait up to `grace` seconds, then
    SIGKILL what is left."""
    tree: list[int] = []
    for child in children:
        for pid in ([child.pid] if child.alive() else []) + descendants(child.pid):
            if pid not in tree:
                tree.append(pid)
    _signal(list(reversed(tree)), signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait(timeout=grace)
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    _signal([p for p in tree if _alive(p)], signal.SIGKILL)
