"""Resume: a fedlora run stopped after round 2 of 4 and continued with
`cotune run --resume` (simulation engine) ends with the same global weights and the
same per-round metrics as an uninterrupted run with the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config, write_sst2

from cotune.cli.main import main
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.checkpoint import load_checkpoint
from cotune.runtime.federated.engine import run_federated


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = write_sst2(tmp_path, n_train=120)
    # 3 clients, 2 sampled per round: the seeded sampling must also line up after resume
    cfg = tiny_config(data, federated={"clients": 3, "rounds": 4, "fraction": 0.67})
    full, part = tmp_path / "full", tmp_path / "part"
    run_federated(cfg, full, engine="inline")
    run_federated(cfg, part, engine="inline", stop_after=2)
    stopped = load_checkpoint(part)
    assert stopped is not None and stopped.round == 2
    assert [r["round"] for r in read_jsonl(part / "metrics.jsonl")] == [1, 2]

    assert main(["run", "--resume", str(part)]) == 0  # the user's path: Ray simulation
    capsys.readouterr()

    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a is not None and b is not None and a.round == b.round == 4
    assert list(a.global_state) == list(b.global_state)
    for name in a.global_state:
        assert np.array_equal(a.global_state[name], b.global_state[name]), name
    # and the run had moved on from round 2 (the test is not vacuous)
    assert any(
        not np.array_equal(stopped.global_state[k], b.global_state[k]) for k in b.global_state
    )

    ra, rb = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["round"] for r in rb] == [1, 2, 3, 4]
    assert [r["accuracy"] for r in ra] == [r["accuracy"] for r in rb]
    assert [r["clients_sampled"] for r in rb] == [2, 2, 2, 2]
    # byte totals carry on across the restart (message heads hold run and node ids, whose
    # encoded sizes differ by a few bytes between engines)
    assert rb[-1]["bytes_up"] == pytest.approx(ra[-1]["bytes_up"], rel=0.01)
    assert rb[-1]["bytes_down"] == pytest.approx(ra[-1]["bytes_down"], rel=0.01)
    summary = json.loads((part / "summary.json").read_text())
    assert summary["rounds_completed"] == 4 and summary["comm"]["bytes_up"] == rb[-1]["bytes_up"]


def test_resume_refuses_a_method_without_checkpoints(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text('method = "split"\n')
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "cannot resume" in capsys.readouterr().err
