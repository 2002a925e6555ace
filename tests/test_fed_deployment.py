"""Deployment engine: `cotune run` with runtime.engine = "deployment" starts a
SuperLink and two SuperNodes on 127.0.0.1, submits cotune's Flower App (the same
`cotune.flower_app` ServerApp and ClientApp the simulation engine runs)
with `flwr run`, completes two fedlora rounds, and stops every process it started.

With SuperNodes of the user's (`runtime.superlink`; here a loopback `LocalFederation`
whose nodes are started with their own `data-path`), every node trains on its own
file and the server process opens none of them (an audit hook logs every file the
ServerApp process opens); nodes without usable data stop the run with status 2."""

from __future__ import annotations

import importlib
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    eventually,
    expected_sha,
    node_files,
    node_rows,
    tiny_fedlora_run_args,
    write_rows,
)

from cotune.cli.main import main
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated import apps
from cotune.runtime.federated.deployment import LocalFederation
from cotune.runtime.federated.flower_cli import APP_DIR
from cotune.runtime.federated.keys import AUDIT_OPENS_ENV

# Files this (the `cotune run`) process opens while `_opened` is a list.
_opened: list[str] | None = None


def _record_opens(event: str, args: tuple[Any, ...]) -> None:
    if _opened is not None and event == "open" and args:
        if isinstance(args[0], str | bytes | os.PathLike):
            _opened.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_record_opens)


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
    run_dir = tmp_path / "run"
    args = tiny_fedlora_run_args(tmp_path, run_dir, "federated.clients=2", "federated.rounds=2",
                                 "federated.round_timeout=300", "runtime.engine=deployment")  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err

    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in records)
    assert records[-1]["bytes_up"] > records[0]["bytes_up"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "deployment" and summary["rounds_completed"] == 2
    assert summary["comm"]["bytes_down"] == records[-1]["bytes_down"]

    # the SuperNodes ran the very ClientApp object the simulation engine uses, from the
    # Flower App cotune submits (not one written into the run folder)
    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    components = app["tool"]["flwr"]["app"]["components"]
    module, attr = components["clientapp"].split(":")
    assert getattr(importlib.import_module(module), attr) is apps.client_app
    assert not (run_dir / "flower-app").exists()
    assert "Start `flwr-clientapp` process" in (run_dir / "logs" / "supernode-1.log").read_text()

    # every SuperLink / SuperNode / app process of this run is gone (one that had to be
    # killed after the stop grace period may take a moment to leave the process table)
    flwr_home = str(run_dir / "federation" / "flwr-home")
    eventually(lambda: _processes_with_env(flwr_home) == [], timeout=60, every=0.2)
    assert _processes_with_env(flwr_home) == []


def _own_data_run(run_dir: Path, fed: LocalFederation, eval_file: Path) -> list[str]:
    superlink = fed.address
    args = ["run", "--out", str(run_dir), "--set", f"runtime.tls_ca={fed.root_certificates}"]
    for kv in (
        "method=fedlora", "model.name=tiny-bert", 'task.name="csv"',
        f"task.eval_file={eval_file}", "train.batch_size=4", "train.max_seq_len=16",
        "federated.clients=3", "federated.rounds=1", "federated.local_steps=1",
        "federated.round_timeout=300", "runtime.engine=deployment",
        f"runtime.superlink={superlink}",
    ):  # fmt: skip
        args += ["--set", kv]
    return args


@pytest.mark.slow
def test_three_supernodes_each_train_on_their_own_file(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch, capsys
) -> None:
    global _opened
    files, rows = node_files(tmp_path / "devices")
    dev = write_rows(tmp_path / "server" / "dev.csv", node_rows(9, 6))
    audit = tmp_path / "server-opens.log"
    monkeypatch.setenv(AUDIT_OPENS_ENV, str(audit))
    run_dir = tmp_path / "run"
    nodes = [{"data-path": str(f)} for f in files]
    with LocalFederation(tmp_path / "fed", 3, node_configs=nodes) as fed:
        _opened = []
        try:
            code = main(_own_data_run(run_dir, fed, dev))
        finally:
            parent, _opened = _opened, None
    assert code == 0, capsys.readouterr().err

    # every node trained on exactly the rows of its own file
    events = read_jsonl(run_dir / "train.jsonl")
    described = {e["data_path"]: e for e in events if e["event"] == "node"}
    trained = {e["partition"]: e for e in events if e["event"] == "client_trained"}
    assert set(described) == {str(f) for f in files} and sorted(trained) == [0, 1, 2]
    for f, r in zip(files, rows, strict=True):
        node = described[str(f)]
        assert (node["examples"], node["data_sha256"]) == (len(r), expected_sha(r))
        after = trained[node["partition"]]
        assert (after["examples"], after["data_sha256"]) == (len(r), expected_sha(r))
    assert len({e["data_sha256"] for e in trained.values()}) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["client_data"] == "node" and summary["evaluated_on"] == "server"
    assert summary["rounds_completed"] == 1 and "accuracy" in summary["metrics"]
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["clients_ok"] == 3

    # the server process (flwr-serverapp) opened its own eval file and no node's file,
    # and neither did `cotune run` (this process): neither was given a training path
    lines = [line.split("\t") for line in audit.read_text().splitlines()]
    server_opens = {path for _, _, path in lines}
    assert len({pid for pid, _, _ in lines}) == 1  # one ServerApp process logged
    assert str(dev) in server_opens  # the audit sees what the server reads
    node_dirs = [str(f.parent) for f in files]
    assert not [p for p in server_opens if any(p.startswith(d) for d in node_dirs)]
    assert str(dev) in parent
    assert not [p for p in parent if any(p.startswith(d) for d in node_dirs)]
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert "train_file" not in config["task"] and "data_dir" not in config["task"]


@pytest.mark.slow
def test_supernodes_without_usable_data_stop_the_run_with_status_2(  # type: ignore[no-untyped-def]
    tmp_path: Path, capsys
) -> None:
    wrong = write_rows(tmp_path / "n2" / "mine.csv", node_rows(2, 4), header=("review", "label"))
    dev = write_rows(tmp_path / "dev.csv", node_rows(9, 4))
    nodes: list[dict[str, str | int | float | bool]] = [
        {"partition-id": 0},  # an old-style node: no data-path
        {"data-path": str(tmp_path / "n1" / "absent.csv")},
        {"data-path": str(wrong)},
    ]
    with LocalFederation(tmp_path / "fed", 3, node_configs=nodes) as fed:
        code = main(_own_data_run(tmp_path / "run", fed, dev))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "3 SuperNode(s) cannot train on their own data" in err
    assert "has no 'data-path' in its node config" in err
    assert f"{tmp_path / 'n1' / 'absent.csv'}' does not exist" in err
    assert "no column 'text' (task.text_column); its columns: review, label" in err
