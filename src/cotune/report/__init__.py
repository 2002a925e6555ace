"""Run folders, plots, the HTML report and run comparison."""

from __future__ import annotations

from cotune.report.html import human_bytes, write_report
from cotune.report.run_folder import (
    PREDICTIONS_FILE,
    SUMMARY_KEYS,
    RunFolder,
    default_run_dir,
    read_jsonl,
    read_predictions,
    read_summary,
)


def finish_run(run: RunFolder) -> None:
    """Write the plot and report.html from the files already in the run folder
    (matplotlib is imported here, after training, not by a device that trains)."""
    from cotune.report.plots import plot_run

    summary = read_summary(run.path)
    evals = read_jsonl(run.metrics_path)
    train = read_jsonl(run.train_path)
    title = f"{summary['method']} / {summary['task']} / {summary['model']}"
    plot_run(train, evals, run.path / "plot.png", title)
    config_path = run.path / "config.toml"
    write_report(run.path, summary, evals, config_path.read_text() if config_path.exists() else "")


__all__ = [
    "PREDICTIONS_FILE",
    "SUMMARY_KEYS",
    "RunFolder",
    "default_run_dir",
    "finish_run",
    "human_bytes",
    "read_jsonl",
    "read_predictions",
    "read_summary",
    "write_report",
]
