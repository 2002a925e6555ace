"""`cotune sweep`: every combination of a grid of config values, times every seed, each
as its own `cotune run` child process, at most `parallel` at a time.

Layout of the output folder:

    OUT/sweep.json                             the grid, the seeds, every combination
    OUT/<key=value>__<key=value>/seed-S/       one run folder per combination and seed
    OUT/<key=value>__<key=value>/seed-S/cotune.log   that run's output
    OUT/<key=value>__<key=value>/aggregate.json      the combination's seeds aggregated

Values are TOML like `--set` (`--grid train.lr=1e-3,2e-3`, `--grid link.codec=int8,fp16`,
`--grid 'memory.ops=["linear"],["linear","softmax"]'`). Every combination's config is
resolved in this process before anything starts, so a bad value fails at once. With
`parallel > 1` each child runs with `train.threads = 1` (the children share the cores).
Resumable like `cotune run --seeds`: a run whose folder holds summary.json is skipped
(if its config matches), an interrupted run with a checkpoint and the same config
continues from it (`cotune run --resume`: a federated run after its last round, a
centralized one after its last save), anything else is run from the start.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.config import Config
from cotune.config.load import parse_value
from cotune.errors import ConfigError
from cotune.report import default_run_dir
from cotune.report.aggregate import SWEEP_FILE, is_finished, seed_dir, write_aggregate
from cotune.runtime.experiment import load_experiment
from cotune.runtime.launcher import Child, cotune_command, stop_all
from cotune.runtime.seeds import Log, check_resumable, continuable, metrics_line

LOG_FILE = "cotune.log"
POLL_S = 0.5


@dataclass(frozen=True)
class Axis:
    """One `--grid key=v1,v2,...`: a config key and its values as TOML texts."""

    key: str
    values: tuple[str, ...]


def split_values(raw: str) -> list[str]:
    """Comma-separated TOML values; commas inside brackets, braces or quotes belong to
    the value (`["a","b"],["c"]` is two values)."""
    out: list[str] = []
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote and raw[i - 1] != "\\":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(raw[start:i].strip())
            start = i + 1
    out.append(raw[start:].strip())
    return out


def parse_grid(items: list[str]) -> list[Axis]:
    axes: list[Axis] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = split_values(raw) if sep else []
        if not key or not values or any(not v for v in values):
            raise ConfigError(
                f"--grid {item!r}: expected key=value1,value2,... (values as TOML, like --set), "
                "e.g. --grid train.lr=1e-3,2e-3"
            )
        if key == "seed":
            raise ConfigError("--grid seed=...: give the seeds with --seeds instead")
        if any(a.key == key for a in axes):
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        for v in values:
            parse_value(v)  # falls back to a string, as --set does
        axes.append(Axis(key, tuple(values)))
    if not axes:
        raise ConfigError("cotune sweep needs at least one --grid key=value1,value2,...")
    return axes


def _unquoted(value: str) -> str:
    v = value.strip()
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'" else v


def combo_label(combo: tuple[tuple[str, str], ...]) -> str:
    """The combination's folder name: `key=value` joined by `__` (a quoted string value
    without its quotes), characters other than letters, digits and `.=+-` replaced by `_`."""
    text = "__".join(f"{k}={_unquoted(v)}" for k, v in combo)
    return re.sub(r"[^A-Za-z0-9.=+\-]", "_", text)[:200]


@dataclass
class Job:
    """One `cotune run` of a sweep: `config` with `sets`, into `run_dir`."""

    combo: tuple[tuple[str, str], ...]
    seed: int
    run_dir: Path
    sets: list[str]
    cfg: Config
    config: str | Path | None = None
    name: str = ""  # shown in the log instead of the combination's label

    @property
    def label(self) -> str:
        return self.name or combo_label(self.combo)


@dataclass
class SweepResult:
    out: Path
    combinations: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def plan(
    config: str | Path | None,
    overrides: list[str],
    axes: list[Axis],
    seeds: list[int] | None,
    out: Path,
    threads_one: bool,
) -> list[Job]:
    """Every (combination, seed) with its `--set`s and resolved config, seed-major (every
    combination's first seed, then every combination's second seed, ...): a sweep stopped
    half-way leaves complete seeds, which pair up across combinations."""
    combos = [
        tuple(zip([a.key for a in axes], values, strict=True))
        for values in itertools.product(*[a.values for a in axes])
    ]
    labels = [combo_label(c) for c in combos]
    if len(set(labels)) != len(labels):
        raise ConfigError("two grid combinations map to one folder name; use distinct values")
    by_combo: list[list[Job]] = []
    for combo, label in zip(combos, labels, strict=True):
        base = [*overrides, *(f"{k}={v}" for k, v in combo)]
        by_combo.append([])
        for seed in seeds if seeds is not None else [load_experiment(config, base).seed]:
            sets = [*base, f"seed={seed}", *(["train.threads=1"] if threads_one else [])]
            by_combo[-1].append(Job(combo, seed, seed_dir(out / label, seed), sets,
                                    load_experiment(config, sets), config))  # fmt: skip
    nth_seeds = itertools.zip_longest(*by_combo)
    return [job for jobs in nth_seeds for job in jobs if job is not None]


def _command(job: Job, resume: bool = False) -> list[str]:
    if resume:  # the run folder's config.toml is the job's (continuable checked it)
        return cotune_command("run", "--resume", str(job.run_dir))
    args = ["run", *([str(job.config)] if job.config is not None else [])]
    for s in job.sets:
        args += ["--set", s]
    return cotune_command(*args, "--out", str(job.run_dir))


def run_sweep(
    config: str | Path | None,
    overrides: list[str],
    axes: list[Axis],
    *,
    seeds: list[int] | None = None,
    parallel: int = 1,
    out: str | Path | None = None,
    log: Log = print,
) -> SweepResult:
    """Run every combination x seed not already finished, at most `parallel` at once,
    then aggregate each combination; returns what was done (failed runs are listed,
    not raised: the others still run)."""
    if out is None:
        out = default_run_dir(f"{load_experiment(config, overrides).name}-sweep")
    folder = Path(out)
    jobs = plan(config, overrides, axes, seeds, folder, threads_one=parallel > 1)
    folder.mkdir(parents=True, exist_ok=True)
    result = SweepResult(folder, failed=run_jobs(jobs, parallel, log))
    result.combinations = _aggregate(folder, axes, jobs)
    sweep = {
        "config": str(config) if config is not None else None,
        "set": overrides,
        "grid": {a.key: list(a.values) for a in axes},
        "seeds": seeds,
        "parallel": parallel,
        "combinations": result.combinations,
        "failed": result.failed,
    }
    (folder / SWEEP_FILE).write_text(json.dumps(sweep, indent=2) + "\n")
    return result


def run_jobs(jobs: list[Job], parallel: int, log: Log = print) -> list[str]:
    """Run the jobs not already finished (in order, at most `parallel` at once, each a
    `cotune run` child logging to its run folder); returns the failed ones as
    `label/seed-S` (a failure does not stop the others)."""
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    todo: list[Job] = []
    resume: dict[int, str] = {}  # id(job) -> where its checkpoint stands
    for job in jobs:
        if is_finished(job.run_dir):
            check_resumable(job.run_dir, job.cfg)
            log(f"[skip] {job.label} seed {job.seed}: already finished (summary.json): not re-run")
            continue
        after = continuable(job.run_dir, job.cfg)
        if after is not None:
            resume[id(job)] = after
            log(f"[resume] {job.label} seed {job.seed}: continues after {after} (its checkpoint)")
        todo.append(job)
    log(f"{len(jobs)} runs: {len(jobs) - len(todo)} already finished, {len(todo)} to run, "
        f"{min(parallel, max(len(todo), 1))} at a time")  # fmt: skip
    failed: list[str] = []
    active: dict[Child, tuple[Job, float]] = {}
    done, total = 0, len(todo)
    try:
        while todo or active:
            while todo and len(active) < parallel:
                job = todo.pop(0)
                job.run_dir.mkdir(parents=True, exist_ok=True)
                cmd = _command(job, resume=id(job) in resume)
                active[Child(cmd, job.run_dir / LOG_FILE)] = (job, time.monotonic())
            time.sleep(POLL_S)
            for child in [c for c in active if not c.alive()]:
                job, t0 = active.pop(child)
                done += 1
                took = time.monotonic() - t0
                head = f"[{done}/{total}] {job.label} seed {job.seed}"
                if child.returncode == 0 and is_finished(job.run_dir):
                    log(f"{head}: {metrics_line(job.run_dir)} ({took:.0f} s)")
                else:
                    failed.append(f"{job.label}/seed-{job.seed}")
                    log(f"{head}: FAILED (exit code {child.returncode}, {took:.0f} s); "
                        f"log: {job.run_dir / LOG_FILE}")  # fmt: skip
    finally:
        stop_all(list(active))
    return failed


def _aggregate(folder: Path, axes: list[Axis], jobs: list[Job]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = []
    for label in dict.fromkeys(j.label for j in jobs):
        mine = [j for j in jobs if j.label == label]
        finished = [j.run_dir for j in mine if is_finished(j.run_dir)]
        entry: dict[str, Any] = {
            "label": label,
            "set": [f"{k}={v}" for k, v in mine[0].combo],
            "dir": label,
            "seeds": [j.seed for j in mine],
            "finished": len(finished),
        }
        if finished:
            write_aggregate(folder / label, finished)
            entry["aggregate"] = f"{label}/aggregate.json"
        combos.append(entry)
    return combos
