"""What the comparison benchmarks share: arms, resumable seed runs, and the summary.

An arm is one setting of a comparison: a config file and `--set` overrides, run once per
seed as `cotune run` child processes (`cotune.runtime.sweep.run_jobs`) into
`OUT/<arm>/seed-S`. Jobs go seed-major across arms (every arm's seed 0 first), at most
`parallel` at once with one thread each, and a finished run is never run again, so
the same command resumes a comparison stopped half-way (e.g. by the end of a session).

The summary (`summarise`) holds, per arm, the per-seed values of every final metric with
their mean and Student-t interval across seeds, the eval size and mean bytes; and, per
pair of arms, the per-seed differences of the primary metric with two intervals:

- `seeds`: the t-interval of the per-seed differences (the spread of training runs);
- `examples`: the paired bootstrap over the eval examples (`cotune compare`'s), the
  mean over the seeds both arms finished (the eval-set sampling error).

A claim is decided on the wider of the two.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cotune.report.aggregate import is_finished, seed_dir, write_aggregate  # noqa: E402
from cotune.report.compare import describe_paired, paired_difference, seed_group  # noqa: E402
from cotune.report.stats import DEFAULT_CONFIDENCE, seed_summary  # noqa: E402
from cotune.runtime.sweep import Job, plan, run_jobs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Arm:
    """One setting of a comparison: `config` with `sets` (`--set KEY=VALUE` strings)."""

    name: str
    config: Path | None
    sets: tuple[str, ...] = ()
    # None: the comparison's seeds. An arm with its own seeds (a reference run, e.g. one
    # seed to count the bytes of a baseline) runs after the comparison's other runs.
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Pair:
    """The difference `a - b` of `metric` (in the metric's units; x100 for points)."""

    a: str
    b: str
    metric: str


@dataclass
class Comparison:
    name: str
    arms: list[Arm]
    pairs: list[Pair] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


def jobs(comparison: Comparison, out: Path, parallel: int) -> list[Job]:
    """Every arm x seed, seed-major, reference arms (own seeds) last; each config
    resolved now (a bad one fails at once)."""

    def arm_jobs(arm: Arm) -> list[Job]:
        seeds = list(arm.seeds) if arm.seeds is not None else comparison.seeds
        planned = plan(arm.config, list(arm.sets), [], seeds, out / arm.name,
                       threads_one=parallel > 1)  # fmt: skip
        for job in planned:
            job.name = arm.name
        return planned

    main = [arm_jobs(a) for a in comparison.arms if a.seeds is None]
    refs = [j for a in comparison.arms if a.seeds is not None for j in arm_jobs(a)]
    return [j for nth in itertools.zip_longest(*main) for j in nth if j is not None] + refs


def run(comparison: Comparison, out: Path, parallel: int) -> list[str]:
    """Run what is not finished yet; returns the failed runs."""
    out.mkdir(parents=True, exist_ok=True)
    return run_jobs(jobs(comparison, out, parallel), parallel, log=lambda s: print(s, flush=True))


def finished_seeds(out: Path, arm: str, seeds: Sequence[int]) -> list[int]:
    return [s for s in seeds if is_finished(seed_dir(out / arm, s))]


def _interval(values: list[float], confidence: float) -> dict[str, Any]:
    return {k: v for k, v in seed_summary(values, confidence).items() if k != "values"}


def arm_summary(out: Path, arm: Arm, seeds: Sequence[int]) -> dict[str, Any]:
    done = finished_seeds(out, arm.name, seeds)
    entry: dict[str, Any] = {"config": _rel(arm.config), "set": list(arm.sets), "seeds": done}
    if not done:
        return entry
    agg = write_aggregate(out / arm.name, [seed_dir(out / arm.name, s) for s in done])
    entry.update(
        {
            "eval_size": agg["eval_size"],
            "eval_examples_shared": agg["eval_examples_shared"],
            "metrics": agg["metrics"],
            "bytes_mean": (agg["comm"]["bytes_up"] or 0) + (agg["comm"]["bytes_down"] or 0),
            "comm": agg["comm"],
            "wall_s_mean": agg["wall_s"],
            "device_peak_bytes_mean": agg["device_peak_bytes"],
            "saved_activation_bytes_mean": agg["saved_activation_bytes"],
        }
    )
    if agg.get("inline_process_peak_bytes"):  # inline federated: not a device's peak
        entry["inline_process_peak_bytes_mean"] = agg["inline_process_peak_bytes"]
    return entry


def pair_summary(
    out: Path, pair: Pair, seeds: Sequence[int], confidence: float = DEFAULT_CONFIDENCE
) -> dict[str, Any]:
    """Per-seed differences over the seeds both arms finished, with both intervals."""
    common = [
        s for s in finished_seeds(out, pair.a, seeds) if s in finished_seeds(out, pair.b, seeds)
    ]
    entry: dict[str, Any] = {"a": pair.a, "b": pair.b, "metric": pair.metric, "seeds": common}
    if not common:
        return entry
    runs_a = [seed_dir(out / pair.a, s) for s in common]
    runs_b = [seed_dir(out / pair.b, s) for s in common]
    a = seed_group(pair.a, out / pair.a, runs_a)
    b = seed_group(pair.b, out / pair.b, runs_b)
    diffs = [
        float(sa["metrics"][pair.metric]) - float(sb["metrics"][pair.metric])
        for sa, sb in zip(a.summaries, b.summaries, strict=True)
    ]
    entry["per_seed"] = diffs
    entry["mean"] = sum(diffs) / len(diffs)
    entry["seeds_interval"] = _interval(diffs, confidence) if len(diffs) > 1 else None
    paired = paired_difference(a, b, pair.metric, confidence=confidence)
    if isinstance(paired, str):
        entry["examples_interval"] = None
        entry["examples_note"] = paired
    else:
        ci = paired.interval
        entry["examples_interval"] = {
            "estimate": ci.estimate, "low": ci.low, "high": ci.high, "confidence": ci.confidence,
            "resamples": ci.resamples, "examples": ci.n, "shared_examples": paired.shared_examples,
        }  # fmt: skip
        entry["examples_note"] = describe_paired(paired)
    lows = [i["low"] for i in (entry["seeds_interval"], entry["examples_interval"]) if i]
    highs = [i["high"] for i in (entry["seeds_interval"], entry["examples_interval"]) if i]
    entry["wider_interval"] = {"low": min(lows), "high": max(highs)} if lows else None
    return entry


def summarise(
    comparison: Comparison, out: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "comparison": comparison.name,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seeds": comparison.seeds,
        "confidence": DEFAULT_CONFIDENCE,
        "intervals": {
            "arm": "Student t over seeds: mean +- t(n-1) * std / sqrt(n)",
            "seeds": "Student t over the per-seed differences a - b",
            "examples": "paired bootstrap over the eval examples (mean over seeds)",
        },
        "runs": _rel(out),
        "arms": {
            arm.name: arm_summary(out, arm, arm.seeds or comparison.seeds)
            for arm in comparison.arms
        },
        "differences": [pair_summary(out, p, comparison.seeds) for p in comparison.pairs],
        **(extra or {}),
    }
    return data


def provisional(diff: dict[str, Any], needed: int, decided: str) -> str:
    """`decided` as it stands, or marked provisional while fewer than `needed` seeds are
    finished by both arms of the pair."""
    seeds = len(diff.get("seeds", []))
    return decided if seeds >= needed else f"provisional ({seeds} of {needed} seeds): {decided}"


def points(x: float | None, scale: float = 100.0) -> str:
    """A difference in points (`scale` 1 for a metric that is a percentage already)."""
    return "n/a" if x is None else f"{scale * x:+.2f}"


def interval(i: dict[str, Any], scale: float = 100.0) -> str:
    """`[low, high]` in points (`scale` 1 for a metric that is a percentage already)."""
    return f"[{scale * i['low']:+.2f}, {scale * i['high']:+.2f}]"


def mean_pm(arm: dict[str, Any], metric: str, scale: float = 100.0) -> str | None:
    """`mean ± half-width` in points, or None before any seed finished."""
    m = arm.get("metrics", {}).get(metric)
    if not m:
        return None
    hw = m.get("half_width")
    return f"{scale * m['mean']:.2f}" + (
        f" ± {scale * hw:.2f}" if hw is not None and hw == hw else ""
    )


def describe(arm: dict[str, Any], metric: str, scale: float = 100.0) -> str:
    """`mean ± half-width (n seeds, m examples)` in points."""
    text = mean_pm(arm, metric, scale)
    if text is None:
        return "not run yet"
    n = len(arm["seeds"])
    return f"{text} ({n} seed{'s' if n != 1 else ''}, {arm['eval_size']} examples)"


def training_batches(config: Path, sets: Sequence[str], batches: int) -> tuple[Any, Any, Any]:
    """(resolved config, model, loader): `config`'s model as its task adapter builds it, and
    a loader over the first `batches` batches' worth of its training examples, drawn as the
    config's seed draws them. The config's data paths are read relative to its folder."""
    from cotune.config import load_config
    from cotune.data import load_task
    from cotune.training import adapter_for

    cfg = load_config(config, list(sets))
    here = Path.cwd()
    os.chdir(config.parent)
    try:
        task = load_task(cfg.task, cfg.seed)
    finally:
        os.chdir(here)
    adapter = adapter_for(task, cfg)
    model, tokenizer = adapter.build_model()
    ds = adapter.encode(task.train[: batches * cfg.train.batch_size], tokenizer)
    return cfg, model, adapter.loader(ds, tokenizer, shuffle=True, seed=cfg.seed)


def write(
    data: dict[str, Any], path: Path, render: Callable[[dict[str, Any]], str] | None = None
) -> None:
    """`path` (JSON, nan as null) and, with `render`, its Markdown next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=1, default=_default) + "\n")
    print(f"wrote {_rel(path)}")
    if render is not None:
        text = render(data)
        path.with_suffix(".md").write_text(text)
        print(text)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _rel(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def differences_table(
    differences: list[dict[str, Any]],
    verdict: Callable[[dict[str, Any]], str] | None = None,
    scale: Callable[[str], float] = lambda metric: 100.0,
) -> list[str]:
    """The Markdown table of the pairs' differences (points): per seed, mean, the seeds'
    t-interval and the paired bootstrap over the eval examples, and a verdict column
    when `verdict` is given. `scale(metric)`: 100 for a 0-1 metric (the default), 1 for
    one that is a percentage already (BLEU, SQuAD F1)."""
    extra = " verdict |" if verdict else ""
    lines = [
        f"| difference | per seed (points) | mean | seeds interval | examples interval |{extra}",
        "|---|---|---|---|---|" + ("---|" if verdict else ""),
    ]
    # with several metrics in one table, each row names its metric
    named = len({d.get("metric") for d in differences}) > 1
    for d in differences:
        label = f"{d['a']} - {d['b']}" + (f" ({d.get('metric')})" if named else "")
        if "mean" not in d:
            lines.append(f"| {label} | not run yet | | | |" + (" |" if verdict else ""))
            continue
        k = scale(d.get("metric", ""))
        si, ei = d.get("seeds_interval"), d.get("examples_interval")
        lines.append(
            f"| {label} | {', '.join(points(x, k) for x in d['per_seed'])} "
            f"| {points(d['mean'], k)} "
            f"| {interval(si, k) if si else 'one seed'} | {interval(ei, k) if ei else '-'} |"
            + (f" {verdict(d)} |" if verdict else "")
        )
    return lines
