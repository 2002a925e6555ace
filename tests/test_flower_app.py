"""cotune as a Flower App: `flwr run flower-app local-simulation` (the repository's
App folder, Flower's own CLI and simulation runtime, nothing of cotune's launcher)
completes a 2-round fedlora run on a tiny model; the App `cotune run` submits is the
same App; the run config names the experiment (a cotune config file, or the
`cotune.*` table)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import eventually

import cotune
from cotune.config import build_config
from cotune.errors import ConfigError
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.app_config import prepare_run_dir, unflatten
from cotune.runtime.federated.flower_cli import APP_DIR, RoundEcho
from cotune.runtime.federated.keys import RESULT_FILE
from cotune.runtime.launcher import child_env, console_script, descendants, free_port

REPO_APP = Path(__file__).resolve().parents[1] / "flower-app"


def _toml(path: Path) -> dict:  # type: ignore[type-arg]
    return tomllib.loads(path.read_text())


def test_the_repository_app_is_the_app_cotune_run_submits() -> None:
    repo, bundled = _toml(REPO_APP / "pyproject.toml"), _toml(APP_DIR / "pyproject.toml")
    assert repo["project"] == bundled["project"]
    assert repo["project"]["version"] == cotune.__version__
    assert repo["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "cotune.flower_app:server_app",
        "clientapp": "cotune.flower_app:client_app",
    }
    assert bundled["tool"]["flwr"]["app"]["components"] == repo["tool"]["flwr"]["app"]["components"]
    # every run-config key cotune run sets exists in both (flwr run refuses unknown keys)
    keys = {"run-dir", "config", "resume", "stop-after", "connect-timeout"}
    for app in (repo, bundled):
        assert keys <= set(app["tool"]["flwr"]["app"]["config"])
    # the repository's App carries a federation and a runnable default experiment
    assert repo["tool"]["flwr"]["federations"]["default"] == "local-simulation"
    table = repo["tool"]["flwr"]["app"]["config"]["cotune"]
    cfg = build_config(table)
    assert cfg.method == "fedlora" and cfg.federated.rounds == 2 and cfg.federated.clients == 2
    assert "federations" not in bundled["tool"]["flwr"]  # flwr run would rewrite the file


def test_the_run_config_names_the_experiment(tmp_path: Path) -> None:
    assert unflatten({"a.b": 1, "a.c": "x", "d": True}) == {"a": {"b": 1, "c": "x"}, "d": True}

    table = {"cotune.method": "fedlora", "cotune.model.name": "tiny-bert",
             "cotune.federated.clients": 3, "cotune.federated.rounds": 5}  # fmt: skip
    out = prepare_run_dir({"run-dir": str(tmp_path / "a"), **table}, run_id=7)
    written = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert out["run-dir"] == str(tmp_path / "a")
    assert written["federated"]["clients"] == 3 and written["model"]["name"] == "tiny-bert"

    # a config file wins over the table
    path = tmp_path / "exp.toml"
    path.write_text('method = "fedavg"\n[model]\nname = "tiny-bert"\n[federated]\nclients = 6\n')
    prepare_run_dir({"run-dir": str(tmp_path / "b"), "config": str(path), **table}, run_id=7)
    written = tomllib.loads((tmp_path / "b" / "config.toml").read_text())
    assert written["method"] == "fedavg" and written["federated"]["clients"] == 6

    # no run-dir: runs/flwr-<run id> under the working directory
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        out = prepare_run_dir(table, run_id=42)
    finally:
        os.chdir(cwd)
    assert out["run-dir"] == str(tmp_path / "runs" / "flwr-42")

    # nothing names an experiment: the error says what to give
    with pytest.raises(ConfigError, match="config="):
        prepare_run_dir({"run-dir": str(tmp_path / "c"), "config": ""}, run_id=1)


def _stop_processes_mentioning(needle: str) -> None:
    """Stop the local SuperLink `flwr` started for this test (found by the test's own
    Flower home in its command line) and everything it spawned, by pid."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline:
            pid = int(entry.name)
            for p in [*reversed(descendants(pid)), pid]:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass


@pytest.mark.slow
def test_flwr_run_of_the_repository_app_on_a_local_simulation(tmp_path: Path) -> None:
    # a copy: Flower 1.41 moves [tool.flwr.federations] into its own config on the first
    # `flwr run` and comments it out in the App's pyproject.toml
    app = tmp_path / "flower-app"
    shutil.copytree(REPO_APP, app)
    home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    env = child_env({
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    })  # fmt: skip
    flwr = console_script("flwr")
    try:
        proc = subprocess.run(
            [flwr, "run", str(app), "local-simulation", "--run-config", f'run-dir="{run_dir}"'],
            env=env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Successfully started run" in proc.stdout
        assert eventually(lambda: (run_dir / RESULT_FILE).exists(), timeout=600, every=1.0), (
            sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else "no run folder"
        )
        records = read_jsonl(run_dir / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2]
        assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in records)
        assert records[-1]["bytes_up"] > records[0]["bytes_up"] > 0
        result = json.loads((run_dir / RESULT_FILE).read_text())
        assert result["rounds_completed"] == 2 and "accuracy" in result["metrics"]
        written = tomllib.loads((run_dir / "config.toml").read_text())
        assert written["method"] == "fedlora" and written["model"]["name"] == "tiny-bert"

        # Flower ran it on its own simulation runtime and saw it finish
        def status() -> str:
            out = subprocess.run(
                [flwr, "ls", "local-simulation", "--format", "json"],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            runs = json.loads(out.stdout).get("runs", []) if out.stdout.strip() else []
            return str(runs[0]["status"]) if runs else ""

        assert eventually(lambda: status().startswith("finished"), timeout=60, every=1.0)
        assert status() == "finished:completed"
        assert "local-simulation" in (home / "config.toml").read_text()
    finally:
        _stop_processes_mentioning(str(home))


def test_cotune_run_echoes_each_new_round_the_server_app_writes(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"round": 1, "accuracy": 0.5}) + "\n")  # before a resume
    seen: list[int] = []
    follow = RoundEcho(tmp_path, lambda r: seen.append(int(r["round"])))
    follow()
    assert seen == []
    with metrics.open("a") as f:
        f.write(json.dumps({"round": 2}) + "\n" + json.dumps({"round": 3}) + "\n")
        f.write('{"round": 4, "acc')  # still being written
    follow()
    follow()
    assert seen == [2, 3]
