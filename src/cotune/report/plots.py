"""Matplotlib figures for a run and for a comparison of runs (headless, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cotune.report.stats import DEFAULT_CONFIDENCE  # noqa: E402

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
        points = [(x, r["loss"]) for x, r in zip(xs, evals, strict=True) if "loss" in r]
        ax.plot(*zip(*points, strict=True), "o-", label="eval loss")
        ax.set_xlabel(key)
    ax.set_title("loss")
    ax.legend(loc="best")
    ax = axes[1]
    if evals:
        key, xs = _x(evals)
        for m in METRIC_KEYS:
            points = [(x, r[m]) for x, r in zip(xs, evals, strict=True) if m in r]
            if points:  # rounds between evaluations have no metric
                ax.plot(*zip(*points, strict=True), "o-", label=m)
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


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def plot_compare(runs: list[dict[str, Any]], metric: str, out: Path) -> Path:
    """Final metric against total bytes on the wire, one point per run; a seed group
    (a row with `interval[metric] = (low, high)`) is its mean with the interval as an
    error bar."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    bars = False
    for r in runs:
        total = max((r["comm"]["bytes_up"] + r["comm"]["bytes_down"]) / 1e6, 1e-6)
        value = r["metrics"].get(metric)
        if value is None:
            continue
        low, high = r.get("interval", {}).get(metric, (None, None))
        if _finite(low) and _finite(high):
            bars = True
            ax.errorbar([total], [value], yerr=[[value - low], [high - value]], fmt="o",
                        markersize=7, capsize=4)  # fmt: skip
            label = f"{r['label']} (n={r.get('n', '?')})"
        else:
            ax.scatter([total], [value], s=50)
            label = r["label"]
        ax.annotate(label, (total, value), fontsize=8)
    if bars:
        ax.text(0.01, 0.01, f"error bars: {DEFAULT_CONFIDENCE:.0%} t-interval over seeds", transform=ax.transAxes,
                fontsize=7, va="bottom")  # fmt: skip
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("bytes on the wire (MB, up + down)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs traffic")
    ax = axes[1]
    labels = [r["label"] for r in runs]
    ax.barh(labels, [r.get("wall_s") or 0 for r in runs])
    ax.set_xlabel("wall time (s)")
    ax.set_title("wall time")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
