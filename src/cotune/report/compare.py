"""`cotune compare RUN_DIR...`: a table of final metrics, bytes, memory and time, plus a plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cotune.errors import UserError
from cotune.report.html import human_bytes
from cotune.report.plots import METRIC_KEYS, plot_compare
from cotune.report.run_folder import read_summary


def load_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    runs = []
    for d in run_dirs:
        path = Path(d)
        if not (path / "summary.json").is_file():
            raise UserError(
                f"{str(path)!r} is not a finished run folder (no summary.json); "
                "give folders written by `cotune run`."
            )
        summary = read_summary(path)
        summary["label"] = path.name
        summary["path"] = str(path)
        runs.append(summary)
    return runs


def compare_table(runs: list[dict[str, Any]]) -> Table:
    metric_cols = [m for m in (*METRIC_KEYS, "loss") if any(m in r["metrics"] for r in runs)]
    table = Table(title="cotune compare")
    for col in (
        "run",
        "method",
        *metric_cols,
        "bytes up",
        "bytes down",
        "device peak",
        "wall s",
    ):
        table.add_column(col, justify="left" if col in ("run", "method") else "right")
    for r in runs:
        m = r["metrics"]
        table.add_row(
            r["label"],
            r["method"],
            *[f"{m[c]:.4f}" if isinstance(m.get(c), float) else "-" for c in metric_cols],
            human_bytes(r["comm"]["bytes_up"]),
            human_bytes(r["comm"]["bytes_down"]),
            human_bytes(r.get("device_peak_bytes")),
            f"{r['wall_s']:.1f}",
        )
    return table


def primary_metric(runs: list[dict[str, Any]]) -> str:
    for m in METRIC_KEYS:
        if all(m in r["metrics"] for r in runs):
            return m
    return "loss"


def compare(run_dirs: list[str | Path], plot_path: str | Path | None = None) -> Path:
    runs = load_runs(run_dirs)
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(compare_table(runs))
    out = Path(plot_path) if plot_path else Path(runs[0]["path"]).parent / "compare.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_compare(runs, primary_metric(runs), out)
    console.print(f"comparison plot: {out}")
    return out
