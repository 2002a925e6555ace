"""The command line: end-to-end runs on tiny models, and bad input -> exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cotune.cli.main import main

SST2_LINES = [
    "sentence\tlabel",
    "a gorgeous , witty , seductive movie .\t1",
    "the plot is nothing but boilerplate clichés .\t0",
    "an utterly charming and hilarious film .\t1",
    "a dull , lifeless mess .\t0",
]


def _sst2_dir(tmp_path: Path, rows: list[str] | None = None) -> Path:
    d = tmp_path / "SST-2"
    d.mkdir()
    lines = rows or SST2_LINES
    header, body = lines[0], lines[1:]
    (d / "train.tsv").write_text("\n".join([header, *body * 8]) + "\n")
    (d / "dev.tsv").write_text("\n".join(lines) + "\n")
    return d


def _run(args: list[str], capsys) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_commit_is_read_before_training(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """summary.json's git_commit names the code the run started with: it is read (and
    cached for the process) before the method trains, not when the summary is written."""
    from cotune.runtime import experiment, provenance

    seen: list[int] = []

    def training(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(provenance.git_commit.cache_info().currsize)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(experiment, "run_method", training)
    provenance.git_commit.cache_clear()
    data = _sst2_dir(tmp_path)
    cfg = experiment.load_experiment(
        None, ["task.name=glue/sst2", f"task.data_dir={json.dumps(str(data))}",
               "model.name=tiny-bert", "train.steps=2"],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="stop before training"):
        experiment.run_experiment(cfg, tmp_path / "run")
    assert seen == [1]


def test_run_tiny_model_writes_contract_folder(tmp_path, capsys) -> None:
    data = _sst2_dir(tmp_path)
    out = tmp_path / "run"
    code, stdout, err = _run(
        [
            "run",
            "--set", "task.name=glue/sst2",
            "--set", f"task.data_dir={json.dumps(str(data))}",
            "--set", "model.name=tiny-bert",
            "--set", "train.steps=6",
            "--set", "train.batch_size=4",
            "--set", "train.eval_every=3",
            "--out", str(out),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    for name in ("config.toml", "metrics.jsonl", "summary.json", "plot.png", "report.html"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "centralized" and summary["task"] == "glue/sst2"
    from importlib.metadata import version

    assert summary["versions"]["transformers"] == version("transformers")
    assert set(summary["versions"]) == {"python", "cotune", "torch", "transformers", "peft", "flwr"}
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():  # a checkout (CI's clean clone is one)
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        assert summary["git_commit"] == head and isinstance(summary["git_dirty"], bool)
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    assert summary["comm"] == {"bytes_up": 0, "bytes_down": 0}
    assert summary["steps"] == 6
    assert summary["saved_activation_bytes"] > 0 and summary["device_peak_bytes"] > 0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6]
    # the resolved config reproduces the run exactly (same seed -> same metrics)
    again = tmp_path / "again"
    code, _, err = _run(["run", str(out / "config.toml"), "--out", str(again)], capsys)
    assert code == 0, err
    assert json.loads((again / "summary.json").read_text())["metrics"] == summary["metrics"]


def test_zero_steps_scores_the_model_as_built(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = _sst2_dir(tmp_path)
    base = ["--set", "task.name=glue/sst2", "--set", f"task.data_dir={json.dumps(str(data))}",
            "--set", "model.name=tiny-bert", "--set", "train.batch_size=4"]  # fmt: skip
    out = tmp_path / "untuned"
    code, _, err = _run(["run", *base, "--set", "train.steps=0", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["final_train_loss"] is None
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0] and "train_loss" not in evals[0]
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4  # every dev sentence scored
    assert summary["metrics"]["accuracy"] == sum(r["correct"] for r in records) / 4
    # one step of training moves the score's inputs: the 0-step run really did not train
    one = tmp_path / "one"
    code, _, err = _run(["run", *base, "--set", "train.steps=1", "--set", "train.lr=0.5",
                         "--out", str(one)], capsys)  # fmt: skip
    assert code == 0, err
    assert (
        json.loads((one / "summary.json").read_text())["metrics"]["loss"]
        != summary["metrics"]["loss"]
    )
    # other methods need steps
    code, _, err = _run(["run", *base, "--set", "train.steps=0", "--set", "method=split",
                         "--out", str(tmp_path / "split")], capsys)  # fmt: skip
    assert code == 2 and "train.steps = 0" in err and "centralized" in err
    assert not (tmp_path / "split").exists()


BAD_INPUTS = [
    (["--set", "method=fedfoo"], "method"),
    (["--set", "task.name=glue/nope"], "task"),
    (["--set", "model.name=no-such-model-xyz"], "no-such-model-xyz"),
    (["--set", "task.name=glue/sst2", "--set", "task.data_dir=/nonexistent/SST-2"], "/nonexistent"),
    (["--set", "train.steps=abc"], "train.steps"),
    (["--set", "train.stepz=3"], "train.stepz"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS)
def test_bad_input_exits_2_without_traceback(args, needle, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = _run(["run", *args, "--set", "train.steps=1", "--out", str(tmp_path / "r")]
                        if "train.steps=abc" not in args else ["run", *args], capsys)  # fmt: skip
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert err.startswith("cotune: error:")


def test_malformed_tsv_row_exits_2(tmp_path, capsys) -> None:
    data = _sst2_dir(tmp_path, [*SST2_LINES, "a row with no label column"])
    code, _, err = _run(
        ["run", "--set", "task.name=glue/sst2", "--set", f"task.data_dir={json.dumps(str(data))}",
         "--set", "model.name=tiny-bert", "--set", "train.steps=1", "--out", str(tmp_path / "r")],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "train.tsv" in err and "line" in err
    assert "Traceback" not in err


def test_missing_config_file_exits_2(tmp_path, capsys) -> None:
    code, _, err = _run(["run", str(tmp_path / "none.toml")], capsys)
    assert code == 2 and "does not exist" in err


def test_real_entry_point_exit_status(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cotune", "run", "--set", "method=nope"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "method" in proc.stderr


def test_models_and_tasks_listings(capsys) -> None:
    code, out, _ = _run(["models"], capsys)
    assert code == 0 and "minilm" in out and "smollm2-135m" in out and "tiny-bert" in out
    code, out, _ = _run(["tasks"], capsys)
    assert code == 0 and "bbc-news" in out and "glue/cola" in out and "mcc" in out


def test_version_names_the_libraries(capsys) -> None:  # type: ignore[no-untyped-def]
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("cotune 0.1.0 (python ")
    assert f"torch {version('torch')}" in out and f"flwr {version('flwr')}" in out
