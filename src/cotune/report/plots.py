"""Matplotlib figures for a run and for a comparison of runs (headless, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC_KEYS = (
    "accuracy",
    "accuracy_mm",
    "f1",
    "mcc",
    "pearson",
    "spearman",
    "bleu",
    "nist",
    "meteor",
    "rouge_l",
    "cider",
)


def _x(records: list[dict[str, Any]]) -> tuple[str, list[float]]:
    key = "round" if records and "round" in records[0] else "step"
    return key, [r.get(key, i) for i, r in enumerate(records)]


def plot_run(
    train: list[dict[str, Any]], evals: list[dict[str, Any]], out: Path, title: str
) -> Path:
    """Training loss, eval metrics, and cumulative bytes against steps or rounds."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train:
        key, xs = _x(train)
        ax.plot(xs, [r.get("loss") for r in train], lw=1, label="train loss")
        ax.set_xlabel(key)
    if evals and any("loss" in r for r in evals):
        key, xs = _x(evals)
        ax.plot(xs, [r.get("loss") for r in evals], "o-", label="eval loss")
        ax.set_xlabel(key)
    ax.set_title("loss")
    ax.legend(loc="best")
    ax = axes[1]
    if evals:
        key, xs = _x(evals)
        for m in METRIC_KEYS:
            if any(m in r for r in evals):
                ax.plot(xs, [r.get(m) for r in evals], "o-", label=m)
        ax.set_xlabel(key)
        ax.legend(loc="best")
    ax.set_title("eval metrics")
    ax = axes[2]
    if evals:
        key, xs = _x(evals)
        ax.plot(xs, [r.get("bytes_up", 0) / 1e6 for r in evals], "o-", label="up (device->cloud)")
        ax.plot(xs, [r.get("bytes_down", 0) / 1e6 for r in evals], "o-", label="down")
        ax.set_xlabel(key)
        ax.legend(loc="best")
    ax.set_title("bytes on the wire (MB, cumulative)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_compare(runs: list[dict[str, Any]], metric: str, out: Path) -> Path:
    """Final metric against total bytes on the wire, one point per run."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for r in runs:
        total = (r["comm"]["bytes_up"] + r["comm"]["bytes_down"]) / 1e6
        value = r["metrics"].get(metric)
        if value is not None:
            ax.scatter([max(total, 1e-6)], [value], s=50)
            ax.annotate(r["label"], (max(total, 1e-6), value), fontsize=8)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("bytes on the wire (MB, up + down)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs traffic")
    ax = axes[1]
    labels = [r["label"] for r in runs]
    ax.barh(labels, [r.get("wall_s", 0) for r in runs])
    ax.set_xlabel("wall time (s)")
    ax.set_title("wall time")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
