"""Run folder contract, report files and `compare`."""

from __future__ import annotations

import json

import pytest

from cotune.errors import UserError
from cotune.report import SUMMARY_KEYS, RunFolder, finish_run, read_jsonl
from cotune.report.compare import compare, load_runs


def _summary(method: str, acc: float, up: int) -> dict:
    return {
        "method": method,
        "task": "glue/sst2",
        "model": "tiny-bert",
        "metrics": {"accuracy": acc, "loss": 0.5},
        "comm": {"bytes_up": up, "bytes_down": up // 2},
        "wall_s": 1.5,
        "device_peak_bytes": 10_000_000,
        "trainable_params": {"device": 10, "cloud": 5},
        "saved_activation_bytes": 1234,
    }


def _write_run(path, method: str, acc: float, up: int) -> RunFolder:
    run = RunFolder(path)
    run.write_config(f'method = "{method}"\n')
    for step in (10, 20):
        run.log_train({"step": step, "loss": 1.0 / step})
        run.log_eval(
            {"step": step, "accuracy": acc * step / 20, "loss": 0.4, "bytes_up": up * step // 20,
             "bytes_down": 0, "wall_s": 0.1 * step}
        )  # fmt: skip
    run.write_summary(_summary(method, acc, up))
    finish_run(run)
    return run


def test_run_folder_has_every_contract_file(tmp_path) -> None:
    run = _write_run(tmp_path / "r", "split", 0.9, 1000)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "plot.png", "report.html"):
        assert (run.path / name).is_file(), name
    summary = json.loads((run.path / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    evals = read_jsonl(run.metrics_path)
    assert [r["step"] for r in evals] == [10, 20]
    html = (run.path / "report.html").read_text()
    assert "plot.png" in html and "split" in html and "1.00 kB" in html
    assert (run.path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_contract_violations_raise(tmp_path) -> None:
    run = RunFolder(tmp_path / "r")
    with pytest.raises(ValueError, match="bytes_up"):
        run.log_eval({"step": 1, "accuracy": 0.5, "bytes_down": 0, "wall_s": 0})
    with pytest.raises(ValueError, match="step or round"):
        run.log_eval({"accuracy": 0.5, "bytes_up": 0, "bytes_down": 0, "wall_s": 0})
    bad = _summary("x", 0.1, 0)
    del bad["comm"]
    with pytest.raises(ValueError, match="comm"):
        run.write_summary(bad)


def test_nan_metrics_become_null(tmp_path) -> None:
    run = RunFolder(tmp_path / "r")
    run.log_eval({"round": 1, "mcc": float("nan"), "bytes_up": 0, "bytes_down": 0, "wall_s": 0})
    assert read_jsonl(run.metrics_path)[0]["mcc"] is None


def test_compare_prints_table_and_writes_plot(tmp_path, capsys) -> None:
    a = _write_run(tmp_path / "a", "centralized", 0.91, 0)
    b = _write_run(tmp_path / "b", "split", 0.90, 5_000_000)
    out = compare([a.path, b.path], tmp_path / "cmp.png")
    text = capsys.readouterr().out
    assert "centralized" in text and "split" in text and "0.9100" in text and "5.00 MB" in text
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_compare_rejects_non_run_folder(tmp_path) -> None:
    with pytest.raises(UserError, match="not a finished run folder"):
        load_runs([tmp_path])
