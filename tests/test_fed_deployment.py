"""Deployment engine: `cotune run` with runtime.engine = "deployment" starts a
SuperLink and two SuperNodes on 127.0.0.1, submits the Flower App (the same
`cotune.runtime.federated.apps` ServerApp and ClientApp the simulation engine runs)
with `flwr run`, completes two fedlora rounds, and stops every process it started."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
from helpers import eventually, write_sst2

from cotune.cli.main import main
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated import apps


def _processes_with_env(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_two_fedlora_rounds_on_a_loopback_superlink(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = write_sst2(tmp_path, n_train=80)
    run_dir = tmp_path / "run"
    args = ["run", "--out", str(run_dir)]
    for kv in (
        "method=fedlora", "model.name=tiny-bert", "task.name=glue/sst2",
        f"task.data_dir={data}", "task.max_eval_examples=32", "train.batch_size=8",
        "train.max_seq_len=24", "federated.clients=2", "federated.rounds=2",
        "federated.local_steps=2", "federated.round_timeout=300", "runtime.engine=deployment",
    ):  # fmt: skip
        args += ["--set", kv]
    assert main(args) == 0, capsys.readouterr().err

    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in records)
    assert records[-1]["bytes_up"] > records[0]["bytes_up"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "deployment" and summary["rounds_completed"] == 2
    assert summary["comm"]["bytes_down"] == records[-1]["bytes_down"]

    # the SuperNodes ran the very ClientApp object the simulation engine uses
    app = tomllib.loads((run_dir / "flower-app" / "pyproject.toml").read_text())
    components = app["tool"]["flwr"]["app"]["components"]
    module, attr = components["clientapp"].split(":")
    assert module == apps.__name__ and getattr(apps, attr) is apps.client_app
    assert "Start `flwr-clientapp` process" in (run_dir / "logs" / "supernode-1.log").read_text()

    # every SuperLink / SuperNode / app process of this run is gone (one that had to be
    # killed after the stop grace period may take a moment to leave the process table)
    flwr_home = str(run_dir / "federation" / "flwr-home")
    eventually(lambda: _processes_with_env(flwr_home) == [], timeout=60, every=0.2)
    assert _processes_with_env(flwr_home) == []
