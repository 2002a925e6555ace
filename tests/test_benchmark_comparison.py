"""The comparison benchmarks' shared harness (benchmarks/comparison.py): seed-major
jobs, resume, per-seed values and both intervals of a difference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import write_sst2

from cotune.report.aggregate import seed_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import comparison as bench  # noqa: E402


def _config(tmp_path: Path) -> Path:
    data = write_sst2(tmp_path, n_train=64, n_dev=40)
    path = tmp_path / "bench.toml"
    path.write_text(
        'name = "bench-test"\nmethod = "centralized"\n\n'
        f'[task]\nname = "glue/sst2"\ndata_dir = {json.dumps(str(data))}\n\n'
        '[model]\nname = "tiny-bert"\n\n'
        "[train]\nsteps = 6\nbatch_size = 8\nmax_seq_len = 24\nthreads = 1\nlr = 1e-3\n"
    )
    return path


def _comparison(config: Path) -> bench.Comparison:
    return bench.Comparison(
        "test",
        [
            bench.Arm("ref", config, ("train.lr=5e-3",), seeds=(0,)),
            bench.Arm("a", config),
            bench.Arm("a-again", config),
            bench.Arm("b", config, ("train.lr=2e-2",)),
        ],
        [bench.Pair("a", "a-again", "accuracy"), bench.Pair("b", "a", "accuracy")],
        seeds=[0, 1],
    )


def test_jobs_are_seed_major_with_reference_arms_last(tmp_path: Path) -> None:
    jobs = bench.jobs(_comparison(_config(tmp_path)), tmp_path / "out", parallel=2)
    assert [(j.label, j.seed) for j in jobs] == [
        ("a", 0), ("a-again", 0), ("b", 0), ("a", 1), ("a-again", 1), ("b", 1), ("ref", 0),
    ]  # fmt: skip
    assert jobs[2].cfg.train.lr == 2e-2 and jobs[2].cfg.train.threads == 1
    assert jobs[3].run_dir == tmp_path / "out" / "a" / "seed-1"


@pytest.mark.slow
def test_comparison_runs_resumes_and_summarises(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    comp = _comparison(_config(tmp_path))
    out = tmp_path / "out"
    assert bench.run(comp, out, parallel=2) == []
    assert "7 runs: 0 already finished, 7 to run" in capsys.readouterr().out
    assert bench.run(comp, out, parallel=2) == []  # resumed: nothing left to run
    assert "7 already finished, 0 to run" in capsys.readouterr().out

    data = bench.summarise(comp, out)
    acc = {
        (arm, s): json.loads((seed_dir(out / arm, s) / "summary.json").read_text())["metrics"][
            "accuracy"
        ]
        for arm in ("a", "a-again", "b")
        for s in (0, 1)
    }
    assert data["arms"]["ref"]["seeds"] == [0]
    a = data["arms"]["a"]
    assert a["seeds"] == [0, 1] and a["eval_size"] == 40
    assert a["metrics"]["accuracy"]["values"] == [acc["a", 0], acc["a", 1]]
    assert (
        a["metrics"]["accuracy"]["low"]
        <= a["metrics"]["accuracy"]["mean"]
        <= a["metrics"]["accuracy"]["high"]
    )

    same, diff = data["differences"]
    # the same config run twice is the same run: differences and intervals exactly 0
    assert same["per_seed"] == [0.0, 0.0] and same["mean"] == 0.0
    assert same["examples_interval"]["low"] == same["examples_interval"]["high"] == 0.0
    assert diff["per_seed"] == [acc["b", 0] - acc["a", 0], acc["b", 1] - acc["a", 1]]
    si, ei = diff["seeds_interval"], diff["examples_interval"]
    assert si["low"] <= diff["mean"] <= si["high"]
    assert ei["low"] <= ei["estimate"] <= ei["high"] and ei["examples"] == 40
    assert ei["shared_examples"] is True
    assert diff["wider_interval"] == {
        "low": min(si["low"], ei["low"]),
        "high": max(si["high"], ei["high"]),
    }

    bench.write(data, tmp_path / "test.json", lambda d: f"{len(d['arms'])} arms\n")
    assert (
        json.loads((tmp_path / "test.json").read_text())["differences"][1]["per_seed"]
        == diff["per_seed"]
    )
    assert (tmp_path / "test.md").read_text() == "4 arms\n"
