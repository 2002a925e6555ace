"""The simulation engine: cotune's Flower App submitted with `flwr run` to a SuperLink
in simulation mode on 127.0.0.1, which runs the ServerApp and `federated.clients`
virtual SuperNodes (Ray actors, `runtime.parallel_clients` of them training at once,
one CPU each) in a `flwr-simulation` process: Flower's current simulation runtime.

The SuperLink (`flower-superlink --simulation`, in-memory state, ports chosen free)
is a `Child` of this run: stopping it stops the simulation process and Ray with it.
Only the sampled clients of a round exist as ClientApp calls; the other virtual
SuperNodes are a node id and a node config each, so memory follows the clients
sampled per round, not `federated.clients`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from cotune.config import Config
from cotune.report import progress
from cotune.runtime.federated.flower_cli import (
    CONNECTION,
    FLWR_HOME_DIR,
    flower_env,
    submit,
    wait_for_result,
    write_connection,
)
from cotune.runtime.federated.keys import RESULT_FILE
from cotune.runtime.federated.server import ServerOptions
from cotune.runtime.launcher import LOOPBACK, Child, console_script, free_port, stop_all

START_TIMEOUT = 120.0  # seconds for the SuperLink to listen (generous: a loaded machine)
STOP_TIMEOUT = 15.0
STATUS_EVERY = 20.0  # seconds between checks that the run is still running
VERBOSE_ENV = "COTUNE_FLOWER_VERBOSE"  # set: Flower's and Ray's INFO logs in the log


def parallel_clients(cfg: Config) -> int:
    """Clients training at once: `runtime.parallel_clients`, else one per CPU core."""
    wanted = cfg.runtime.parallel_clients or os.cpu_count() or 1
    return max(1, min(wanted, cfg.federated.clients))


def federation_config(cfg: Config) -> dict[str, Any]:
    """The simulation runtime's settings (`flwr run --federation-config`): one virtual
    SuperNode per client, each ClientApp on one CPU (so torch runs one thread in it),
    Ray given `parallel_clients` CPUs."""
    verbose = bool(os.environ.get(VERBOSE_ENV))
    return {
        "num-supernodes": cfg.federated.clients,
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.0,
        "init-args-num-cpus": parallel_clients(cfg),
        "init-args-num-gpus": 0,
        "init-args-logging-level": "INFO" if verbose else "WARNING",
        "init-args-log-to-driver": verbose,
        "verbose": verbose,
    }


class LocalSimulation:
    """A SuperLink in simulation mode on 127.0.0.1 (in-memory state, no runtime
    dependency installation), with its own Flower home for the CLI's connection."""

    def __init__(self, workdir: Path, log_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.log_dir = log_dir or workdir
        self.flwr_home = workdir / FLWR_HOME_DIR
        self.port = 0
        self.children: list[Child] = []

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> LocalSimulation:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        link = Child(
            [console_script("flower-superlink"), "--insecure", "--simulation",
             "--host", LOOPBACK, "--port", str(self.port),
             "--disable-runtime-dependency-installation"],
            self.log_dir / "superlink.log",
            env=flower_env(self.flwr_home),
        )  # fmt: skip
        self.children.append(link)
        link.wait_for_port(LOOPBACK, self.port, START_TIMEOUT, "the Flower simulation SuperLink")
        # the simulation SuperLink serves only this machine's loopback, in clear
        write_connection(self.flwr_home, self.address, insecure=True)
        return self

    def problem(self) -> str | None:
        """Why the run cannot end well (the SuperLink died), or None."""
        for child in self.children:
            if not child.alive():
                return (
                    f"the Flower simulation SuperLink exited ({child.returncode}); the end "
                    f"of its log ({child.log_path}):\n{child.tail()}"
                )
        return None

    def stop(self) -> None:
        """Stop the SuperLink and everything it spawned (the simulation, Ray)."""
        stop_all(self.children, grace=STOP_TIMEOUT)
        self.children.clear()

    def __enter__(self) -> LocalSimulation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_status(flwr_home: Path, run_id: int) -> str:
    """The run's status as the SuperLink reports it (`flwr ls --run-id`), e.g.
    "running" or "finished:failed"; "" when it cannot be read."""
    proc = subprocess.run(
        [console_script("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=flower_env(flwr_home), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    try:
        runs = json.loads(proc.stdout).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        return ""
    return str(runs[0].get("status", "")) if runs else ""


def started_run_id(output: str) -> int | None:
    """The run id in `flwr run`'s "Successfully started run N" line."""
    for line in output.splitlines():
        if "Successfully started run" in line:
            words = line.split("Successfully started run", 1)[1].split()
            if words and words[0].isdigit():
                return int(words[0])
    return None


def run_in_simulation(cfg: Config, options: ServerOptions, timeout: float | None = None) -> None:
    """Start a simulation SuperLink, submit the run to it, return when the ServerApp has
    written its result (or raise); the SuperLink is stopped either way."""
    run_dir = options.run_dir
    with LocalSimulation(run_dir / "simulation", run_dir / "logs") as sim:
        output = submit(sim.flwr_home, options, federation_config(cfg))
        run_id = started_run_id(output)
        checked = [0.0]

        def problem() -> str | None:
            dead = sim.problem()
            if dead or run_id is None:
                return dead
            if time.monotonic() - checked[0] < STATUS_EVERY:
                return None
            checked[0] = time.monotonic()
            status = run_status(sim.flwr_home, run_id)
            if status.startswith("finished") and not (run_dir / RESULT_FILE).exists():
                return (
                    f"the Flower run {run_id} ended ({status}) without a result; see "
                    f"{sim.log_dir / 'superlink.log'}"
                )
            return None

        wait_for_result(run_dir, timeout, problem, progress.echo(cfg.federated.rounds))
