"""Seed groups: the runs of one config that differ only in `seed`, and their aggregate.

`cotune run CONFIG --seeds 0,1,2 --out DIR` writes one run folder per seed
(`DIR/seed-0`, ...) and `DIR/aggregate.json` (`write_aggregate`): per final metric the
per-seed values, their mean, sample standard deviation and Student-t interval across
seeds (`report.stats`), plus the number of seeds and the eval size (examples in each
run's predictions.jsonl). `cotune compare` recognises a folder holding aggregate.json,
and groups loose run folders whose configs are equal but for `seed` (`config_key`).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cotune.errors import UserError
from cotune.report.run_folder import read_predictions, read_summary
from cotune.report.stats import DEFAULT_CONFIDENCE, seed_summary

AGGREGATE_FILE = "aggregate.json"
SWEEP_FILE = "sweep.json"  # a sweep's folder (`cotune sweep`): its combinations are groups
SEED_DIR_PREFIX = "seed-"


def seed_dir(out: str | Path, seed: int) -> Path:
    """The run folder of `seed` in a seed group's folder."""
    return Path(out) / f"{SEED_DIR_PREFIX}{seed}"


def is_finished(run_dir: str | Path) -> bool:
    """A run folder whose run ended (summary.json is written last but for the plots)."""
    return (Path(run_dir) / "summary.json").is_file()


def config_key(run_dir: str | Path) -> str | None:
    """The run's resolved config without `seed` (canonical JSON), or None without a
    config.toml: runs with equal keys differ only in their seed."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return None
    data = tomllib.loads(path.read_text())
    data.pop("seed", None)
    return json.dumps(data, sort_keys=True)


def example_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies an eval example of a predictions.jsonl record across runs: its
    split, index and label (or prompt, for generation)."""
    return (record["split"], record["index"], record.get("label", record.get("prompt")))


def eval_sizes(run_dir: str | Path) -> dict[str, int]:
    """Eval examples per split in the run's predictions.jsonl (empty without one)."""
    return dict(Counter(str(r["split"]) for r in read_predictions(run_dir)))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mean(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if _number(v)]
    return sum(xs) / len(xs) if xs else None


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def aggregate_runs(
    run_dirs: Sequence[str | Path],
    confidence: float = DEFAULT_CONFIDENCE,
    base: str | Path | None = None,
) -> dict[str, Any]:
    """The aggregate of finished runs of one config (one per seed): for every final
    metric all runs report, its per-seed values, mean, sample std and t-interval
    (`low`, `high`, `half_width`); `n_seeds`, `seeds`, the eval size; mean bytes and wall
    time. Run paths are written relative to `base` when inside it."""
    if not run_dirs:
        raise UserError("no finished runs to aggregate")
    paths = [Path(d) for d in run_dirs]
    summaries = [read_summary(p) for p in paths]
    first = summaries[0]
    metrics = [
        k
        for k, v in first["metrics"].items()
        if _number(v) and all(_number(s["metrics"].get(k)) for s in summaries)
    ]
    sizes = [eval_sizes(p) for p in paths]
    same_size = all(s == sizes[0] for s in sizes)
    keys = [[example_key(r) for r in read_predictions(p)] for p in paths]
    shared = all(k == keys[0] for k in keys) if all(keys) else None
    where = Path(base) if base is not None else paths[0].parent
    return {
        "name": first.get("name"),
        "method": first["method"],
        "task": first["task"],
        "model": first["model"],
        "n_seeds": len(paths),
        "seeds": [s.get("seed") for s in summaries],
        "runs": [_relative(p, where) for p in paths],
        "confidence": confidence,
        "interval": "Student t over seeds (n - 1 degrees of freedom): mean +- t * std / sqrt(n)",
        "eval_size": sum(sizes[0].values()) if same_size and sizes[0] else None,
        "eval_size_by_split": sizes[0] if same_size else None,
        **({} if same_size else {"eval_size_by_run": sizes}),
        # every seed scored on the same examples (False: a seeded eval subsample or split,
        # so the spread across seeds includes the eval-set draw)
        "eval_examples_shared": shared,
        "metrics": {
            k: seed_summary([s["metrics"][k] for s in summaries], confidence) for k in metrics
        },
        "comm": {
            "bytes_up": _mean([s["comm"]["bytes_up"] for s in summaries]),
            "bytes_down": _mean([s["comm"]["bytes_down"] for s in summaries]),
        },
        "wall_s": _mean([s.get("wall_s") for s in summaries]),
        "device_peak_bytes": _mean([s.get("device_peak_bytes") for s in summaries]),
        # federated runs on the inline engine: the process's peak, not a device's
        "inline_process_peak_bytes": _mean([s.get("inline_process_peak_bytes") for s in summaries]),
        "saved_activation_bytes": _mean([s.get("saved_activation_bytes") for s in summaries]),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_aggregate(
    folder: str | Path, run_dirs: Sequence[str | Path], confidence: float = DEFAULT_CONFIDENCE
) -> dict[str, Any]:
    """Aggregate `run_dirs` into `folder/aggregate.json` (nan, e.g. the interval of a
    single seed, becomes null); returns the aggregate."""
    agg = aggregate_runs(run_dirs, confidence, base=folder)
    path = Path(folder) / AGGREGATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(agg), indent=2) + "\n")
    return agg


def group_runs(folder: str | Path) -> list[Path]:
    """The finished run folders of the seed group in `folder` (listed in its
    aggregate.json, else its `seed-*` subfolders)."""
    folder = Path(folder)
    path = folder / AGGREGATE_FILE
    if path.is_file():
        listed = json.loads(path.read_text()).get("runs", [])
        runs = [p if p.is_absolute() else folder / p for p in map(Path, listed)]
    else:
        runs = sorted(folder.glob(f"{SEED_DIR_PREFIX}*"))
    return [r for r in runs if is_finished(r)]


def format_metric(name: str, m: dict[str, Any], confidence: float = DEFAULT_CONFIDENCE) -> str:
    """One line for a metric of an aggregate: mean +- half-width, interval, per seed."""
    values = ", ".join(f"{v:.4f}" for v in m["values"])
    hw = m.get("half_width")
    if hw is None or (isinstance(hw, float) and math.isnan(hw)):
        return f"{name}: {m['mean']:.4f} (one seed: no interval; value {values})"
    return (
        f"{name}: {m['mean']:.4f} ± {hw:.4f} ({confidence:.0%} t-interval "
        f"[{m['low']:.4f}, {m['high']:.4f}], std {m['std']:.4f}; per seed {values})"
    )
