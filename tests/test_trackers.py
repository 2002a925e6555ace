"""Experiment trackers: TensorBoard event files read back with tensorboard's own reader;
a tracker whose package is missing is a config error before the run starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cotune.cli.main import main
from cotune.report.run_folder import read_jsonl


def _events(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tsv(folder: Path) -> Path:
    folder.mkdir()
    rows = ["sentence\tlabel"] + [f"{w} film {i}\t{int(w == 'good')}" for i in range(20)
                                  for w in ("good", "bad")]  # fmt: skip
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    return folder


BASE = ["--set", "task.name=sst2", "--set", "model.name=tiny-bert", "--set", "train.batch_size=4",
        "--set", "runtime.loggers=['tensorboard']"]  # fmt: skip


def test_tensorboard_holds_what_the_run_folder_holds(tmp_path: Path) -> None:
    data = _tsv(tmp_path / "SST-2")
    run = tmp_path / "central"
    code = main(["--quiet", "run", *BASE, "--set", f"task.data_dir={data}", "--set", "train.steps=12",
                 "--set", "train.eval_every=4", "--out", str(run)])  # fmt: skip
    assert code == 0
    scalars = _events(run)
    evals = read_jsonl(run / "metrics.jsonl")
    assert [s for s, _ in scalars["eval/accuracy"]] == [r["step"] for r in evals] == [4, 8, 12]
    assert [v for _, v in scalars["eval/accuracy"]] == pytest.approx([r["accuracy"] for r in evals])
    train = read_jsonl(run / "train.jsonl")
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in train])


def test_tensorboard_for_federated_rounds(tmp_path: Path) -> None:
    data = _tsv(tmp_path / "SST-2")
    run = tmp_path / "fed"
    code = main(["--quiet", "run", *BASE, "--set", f"task.data_dir={data}", "--set", "method=fedlora",
                 "--set", "federated.rounds=2", "--set", "federated.clients=2",
                 "--set", "federated.local_steps=1", "--set", "runtime.engine=inline",
                 "--out", str(run)])  # fmt: skip
    assert code == 0
    rounds = read_jsonl(run / "metrics.jsonl")
    assert [s for s, _ in _events(run)["eval/bytes_up"]] == [r["round"] for r in rounds] == [1, 2]


def test_missing_tracker_package_is_a_config_error(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--set", "runtime.loggers=['mlflow']", "--set", "model.name=tiny-bert"])
    assert code == 2
    assert "pip install mlflow" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
