"""`cotune compare RUN_OR_SEED_DIR...`: a table of final metrics, bytes, memory and time,
a plot, and for two runs (or seed groups) on the same examples their paired difference.

Each argument is a run folder (summary.json), a seed group's folder (aggregate.json,
written by `cotune run --seeds`) or a sweep's folder (sweep.json: each of its
combinations is a group). Run folders given loose whose configs are equal but for
`seed` are grouped too. A group's row shows every metric as `mean ± half-width` of its
t-interval across seeds and its number of seeds `n`; the plot draws that interval as an
error bar. Single runs are shown as they are.

With exactly two entries whose predictions.jsonl cover the same examples, the primary
metric's difference (first minus second) gets a paired bootstrap interval over the eval
examples (`report.stats`; for a group, the statistic of a resample is the mean over its
seeds), and the output says whether it excludes 0.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cotune.errors import UserError
from cotune.report.aggregate import (
    AGGREGATE_FILE,
    SWEEP_FILE,
    aggregate_runs,
    config_key,
    example_key,
    group_runs,
    is_finished,
)
from cotune.report.html import human_bytes
from cotune.report.plots import METRIC_KEYS, plot_compare
from cotune.report.run_folder import read_jsonl, read_predictions, read_summary
from cotune.report.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    PER_EXAMPLE_METRICS,
    Interval,
    metric_statistic,
    paired_bootstrap_mean_interval,
)


@dataclass
class Entry:
    """One line of the comparison: a single run, or a seed group (`aggregate` set)."""

    label: str
    path: Path
    runs: list[Path]
    summaries: list[dict[str, Any]]
    aggregate: dict[str, Any] | None = None

    @property
    def is_group(self) -> bool:
        return self.aggregate is not None


def _not_a_run(path: Path) -> UserError:
    return UserError(
        f"{str(path)!r} is not a finished run folder (no summary.json), nor a seed group "
        "(aggregate.json) or a sweep (sweep.json); give folders written by `cotune run` "
        "or `cotune sweep`."
    )


def _single(path: Path) -> Entry:
    if not is_finished(path):
        raise _not_a_run(path)
    summary = read_summary(path)
    return Entry(path.name, path, [path], [summary])


def seed_group(label: str, path: Path, runs: list[Path]) -> Entry:
    """The runs of one config differing only in seed, as one entry."""
    return Entry(label, path, runs, [read_summary(r) for r in runs], aggregate_runs(runs))


def load_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The summaries of single run folders (labelled with their folder name)."""
    runs = []
    for d in run_dirs:
        entry = _single(Path(d))
        runs.append({**entry.summaries[0], "label": entry.label, "path": str(entry.path)})
    return runs


def load_entries(paths: list[str | Path]) -> list[Entry]:
    """Runs, seed groups and sweeps as comparison entries; loose runs of one config
    that differ only in seed become one group."""
    entries: list[Entry] = []
    for d in paths:
        path = Path(d)
        if (path / SWEEP_FILE).is_file():
            sweep = json.loads((path / SWEEP_FILE).read_text())
            for combo in sweep.get("combinations", []):
                runs = group_runs(path / combo["dir"])
                if runs:
                    entries.append(seed_group(combo["label"], path / combo["dir"], runs))
        elif (path / AGGREGATE_FILE).is_file():
            runs = group_runs(path)
            if not runs:
                raise UserError(f"{str(path)!r}: its aggregate.json lists no finished run")
            entries.append(seed_group(path.name, path, runs))
        else:
            entries.append(_single(path))
    return group_loose_runs(entries)


def group_loose_runs(entries: list[Entry]) -> list[Entry]:
    """Replace single runs with equal configs but for distinct seeds by one group (at
    the position of its first run)."""
    buckets: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        key = None if e.is_group else config_key(e.path)
        if key is not None:
            buckets.setdefault(key, []).append(i)
    merged: dict[int, Entry] = {}
    dropped: set[int] = set()
    for members in buckets.values():
        seeds = [entries[i].summaries[0].get("seed") for i in members]
        if len(members) < 2 or len(set(seeds)) != len(seeds):
            continue
        runs = [entries[i].path for i in members]
        first = entries[members[0]]
        name = first.summaries[0].get("name") or first.label
        label = f"{name} (seeds {', '.join(str(s) for s in seeds)})"
        merged[members[0]] = seed_group(label, first.path.parent, runs)
        dropped.update(members[1:])
    return [merged.get(i, e) for i, e in enumerate(entries) if i not in dropped]


# ----------------------------------------------------------------------------- rows


def entry_row(e: Entry) -> dict[str, Any]:
    """What the table and the plot show of an entry: metrics (a group's means), traffic,
    memory, time, and for groups `n` and the per-metric `interval` (low, high)."""
    if e.aggregate is None:
        s = e.summaries[0]
        return {**s, "label": e.label, "path": str(e.path), "n": 1}
    agg = e.aggregate
    return {
        "label": e.label,
        "path": str(e.path),
        "method": agg["method"],
        "n": agg["n_seeds"],
        "metrics": {k: m["mean"] for k, m in agg["metrics"].items()},
        "interval": {k: (m["low"], m["high"]) for k, m in agg["metrics"].items()},
        "comm": agg["comm"],
        "device_peak_bytes": agg.get("device_peak_bytes"),
        "wall_s": agg.get("wall_s"),
    }


def _cell(row: dict[str, Any], metric: str) -> str:
    value = row["metrics"].get(metric)
    if not isinstance(value, float):
        return "-"
    low, high = row.get("interval", {}).get(metric, (None, None))
    if not _finite(low) or not _finite(high):
        return f"{value:.4f}"
    return f"{value:.4f} ± {(high - low) / 2:.4f}"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def compare_table(runs: list[dict[str, Any]]) -> Table:
    """The comparison table of rows (`entry_row`, or plain summaries with a label)."""
    metric_cols = [m for m in (*METRIC_KEYS, "loss") if any(m in r["metrics"] for r in runs)]
    groups = any(r.get("n", 1) > 1 for r in runs)
    title = "cotune compare"
    if groups:
        title += (
            f" (groups: mean ± half-width of the {DEFAULT_CONFIDENCE:.0%} t-interval over n seeds)"
        )
    table = Table(title=title)
    cols = ["run", "method", *(["n"] if groups else []), *metric_cols]
    for col in (*cols, "bytes up", "bytes down", "device peak", "wall s"):
        table.add_column(col, justify="left" if col in ("run", "method") else "right")
    for r in runs:
        wall = r.get("wall_s")
        table.add_row(
            r["label"],
            r["method"],
            *([str(r.get("n", 1))] if groups else []),
            *[_cell(r, c) for c in metric_cols],
            human_bytes(r["comm"]["bytes_up"]),
            human_bytes(r["comm"]["bytes_down"]),
            human_bytes(r.get("device_peak_bytes")),
            f"{wall:.1f}" if isinstance(wall, int | float) else "-",
        )
    return table


def primary_metric(runs: list[dict[str, Any]]) -> str:
    for m in METRIC_KEYS:
        if all(m in r["metrics"] for r in runs):
            return m
    return "loss"


# ----------------------------------------------------------------------------- paired


@dataclass
class PairedDifference:
    """The paired bootstrap interval of `metric(a) - metric(b)` on split `split`, over
    `pairs` runs paired by seed (1 for two single runs)."""

    metric: str
    split: str
    interval: Interval
    a: str
    b: str
    pairs: int
    shared_examples: bool


def _split_records(run: Path, split: str) -> list[dict[str, Any]]:
    return [r for r in read_predictions(run) if r["split"] == split]


def _references(run: Path, split: str, n: int) -> list[list[str]] | None:
    refs = [list(g["refs"]) for g in read_jsonl(run / "generations.jsonl") if g["split"] == split]
    return refs if len(refs) == n else None


def _seed_pairs(a: Entry, b: Entry) -> list[tuple[int, int]] | str:
    """Which run of `a` goes with which run of `b` (indices into `runs`): by seed for two
    groups, every run of a group with the single run of the other side."""
    if len(a.runs) > 1 and len(b.runs) > 1:
        seeds_a = [s.get("seed") for s in a.summaries]
        seeds_b = [s.get("seed") for s in b.summaries]
        if sorted(map(str, seeds_a)) != sorted(map(str, seeds_b)):
            return (
                f"no paired interval: the groups ran different seeds ({seeds_a} and {seeds_b}); "
                "a paired comparison pairs the runs of each seed"
            )
        return [(i, seeds_b.index(seed)) for i, seed in enumerate(seeds_a)]
    return [(i, j) for i in range(len(a.runs)) for j in range(len(b.runs))]


def paired_difference(
    a: Entry,
    b: Entry,
    metric: str,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> PairedDifference | str:
    """The paired bootstrap of `metric(a) - metric(b)` over the examples of the first
    eval split, or the reason it cannot be computed.

    Two groups are paired seed by seed, a group and a single run each seed with the
    run; each pair must have been scored on the same examples (same indices and labels,
    or prompts). When every run shares one set of examples the resampled indices are
    shared too; when each seed has its own eval examples, each pair is resampled on its
    own (`report.stats.paired_bootstrap_mean_interval`)."""
    if metric not in PER_EXAMPLE_METRICS:
        return (
            f"no paired interval for {metric!r}: it cannot be recomputed per example "
            f"(supported: {', '.join(PER_EXAMPLE_METRICS)})"
        )
    runs = [*a.runs, *b.runs]
    missing = [str(r) for r in runs if not (r / "predictions.jsonl").is_file()]
    if missing:
        return f"no paired interval: no predictions.jsonl in {', '.join(missing)}"
    pairs = _seed_pairs(a, b)
    if isinstance(pairs, str):
        return pairs
    split = str(read_predictions(runs[0])[0]["split"])
    records = [_split_records(r, split) for r in runs]
    keys = [[example_key(x) for x in recs] for recs in records]
    off = len(a.runs)
    if any(keys[i] != keys[off + j] for i, j in pairs):
        return (
            f"no paired interval: the runs were not evaluated on the same examples of {split!r} "
            "(other eval data, or an eval subsample or split that depends on the seed)"
        )
    stats = []
    for run, recs in zip(runs, records, strict=True):
        refs = _references(run, split, len(recs)) if metric == "bleu" else None
        if metric == "bleu" and refs is None:
            return "no paired interval for bleu: no generations.jsonl with the references"
        try:
            stats.append(metric_statistic(metric, recs, refs))
        except ValueError as err:
            return f"no paired interval: {err}"
    shared = all(k == keys[0] for k in keys)
    interval = paired_bootstrap_mean_interval(
        [(stats[i], stats[off + j], len(keys[i])) for i, j in pairs], shared_examples=shared,
        confidence=confidence, resamples=resamples, seed=seed,
    )  # fmt: skip
    return PairedDifference(metric, split, interval, a.label, b.label, len(pairs), shared)


def describe_paired(p: PairedDifference) -> str:
    ci = p.interval
    verdict = (
        f"excludes 0: {p.a if ci.estimate > 0 else p.b} is higher"
        if ci.excludes(0.0)
        else "includes 0: no difference established on these examples"
    )
    text = (
        f"paired bootstrap ({ci.resamples} resamples of the {ci.n} examples of split "
        f"{p.split!r}, seed {ci.seed}): {p.metric} of {p.a} minus {p.b} = {ci.estimate:+.4f}, "
        f"{ci.confidence:.0%} interval [{ci.low:+.4f}, {ci.high:+.4f}]: {verdict}"
    )
    if p.pairs > 1:
        how = (
            "the same resampled examples for every seed"
            if p.shared_examples
            else "each seed's own eval examples resampled independently"
        )
        text += (
            f" (the mean over {p.pairs} seed pairs, {how}: the interval covers eval-set "
            "sampling; the spread across seeds is the ± column)"
        )
    return text


def compare(
    run_dirs: list[str | Path],
    plot_path: str | Path | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
) -> Path:
    entries = load_entries(run_dirs)
    rows = [entry_row(e) for e in entries]
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(compare_table(rows))
    metric = primary_metric(rows)
    if len(entries) == 2:
        paired = paired_difference(entries[0], entries[1], metric, resamples=resamples)
        text = paired if isinstance(paired, str) else describe_paired(paired)
        console.print(text, markup=False, highlight=False)
    out = Path(plot_path) if plot_path else Path(rows[0]["path"]).parent / "compare.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_compare(rows, metric, out)
    console.print(f"comparison plot: {out}")
    return out
