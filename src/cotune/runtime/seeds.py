"""Repeated runs: one config, several seeds, one run folder each, then their aggregate.

`run_seeds` runs `CONFIG --set seed=S` for every seed S into `OUT/seed-S` (in this
process, one after another: the same as `cotune run CONFIG --set seed=S --out
OUT/seed-S`), then writes `OUT/aggregate.json` (`report.aggregate`). It resumes: a seed
whose folder already holds summary.json is not run again, provided its config.toml is
the one this invocation would write (otherwise it stops, naming the keys that differ,
so two configs never end up in one aggregate). A folder without summary.json (a run
that crashed or was interrupted) continues from its checkpoint (a federated run's last
round, a centralized run's last save) when its config.toml is this invocation's
(`continuable`); any other such folder is run again from the start.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cotune.config import Config, build_config, to_toml
from cotune.errors import ConfigError, UserError
from cotune.methods import resolve
from cotune.report import default_run_dir, read_summary
from cotune.report.aggregate import is_finished, seed_dir, write_aggregate
from cotune.runtime.experiment import load_experiment, resumable_methods, run_experiment
from cotune.runtime.federated.checkpoint import checkpoint_round
from cotune.training.resume import checkpoint_step

Log = Callable[[str], None]

# keys that may differ between a finished run and a resumed invocation: they do not
# change what a run computes (how many threads it used, whether it saved checkpoints to
# resume from, whether it exported its model at the end)
IGNORED_KEYS = {
    ("train", "threads"),
    ("runtime", "checkpoint"),
    ("runtime", "checkpoint_minutes"),
    ("runtime", "export"),
}


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` or ranges `0-4` (inclusive), mixed: distinct non-negative integers."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if "-" in part[1:]:
                lo, _, hi = part.partition("-")
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ConfigError(
                f"--seeds {text!r}: expected comma-separated integers or ranges, e.g. "
                "--seeds 0,1,2 or --seeds 0-4"
            ) from None
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds {text!r}: give one or more non-negative integers")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"--seeds {text!r}: seed(s) {repeated} given twice")
    return seeds


def _flatten(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def config_differences(run_dir: Path, cfg: Config) -> list[str]:
    """Keys whose value in `run_dir/config.toml` differs from `cfg` (threads aside).

    The finished run's config is read through the current schema first, so a key added
    to cotune after that run (written by newer runs with its default) counts as its
    default, not as a difference; a config the schema no longer accepts is compared as
    written."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return ["(no config.toml)"]
    data = tomllib.loads(path.read_text())
    try:
        data = tomllib.loads(to_toml(resolve(build_config(data))))
    except UserError:
        pass
    old = _flatten(data)
    new = _flatten(tomllib.loads(to_toml(cfg)))
    keys = sorted(k for k in set(old) | set(new) if k not in IGNORED_KEYS)
    return [".".join(k) for k in keys if old.get(k) != new.get(k)]


def check_resumable(run_dir: Path, cfg: Config) -> None:
    """A finished run may stand in for `cfg`'s run only if it ran the same config."""
    diff = config_differences(run_dir, cfg)
    if diff:
        raise UserError(
            f"{run_dir} already holds a finished run of a different config (differing keys: "
            f"{', '.join(diff[:8])}{', ...' if len(diff) > 8 else ''}); give another --out, "
            "or remove that folder to run it again"
        )


def continuable(run_dir: Path, cfg: Config) -> str | None:
    """Where an interrupted run of `cfg` in `run_dir` can continue from (`cotune run
    --resume`), as "round 3" (federated) or "step 120" (centralized), or None when it
    must start again: it finished, its method cannot resume, it has no checkpoint, or
    its folder holds another config."""
    if is_finished(run_dir) or cfg.method not in resumable_methods():
        return None
    done = checkpoint_round(run_dir)
    where = f"round {done}" if done is not None else None
    if where is None and (step := checkpoint_step(run_dir)) is not None:
        where = f"step {step}"
    if where is None or config_differences(run_dir, cfg):
        return None
    return where


def metrics_line(run_dir: Path) -> str:
    summary = read_summary(run_dir)
    return ", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float))


def seed_configs(
    config: str | Path | None, overrides: list[str], seeds: list[int]
) -> dict[int, Config]:
    """Every seed's resolved config (`--set seed=S` last), checked before anything runs."""
    return {s: load_experiment(config, [*overrides, f"seed={s}"]) for s in seeds}


def run_seeds(
    config: str | Path | None,
    overrides: list[str],
    seeds: list[int],
    out: str | Path | None = None,
    *,
    log: Log = print,
) -> Path:
    """Run the config once per seed into `out/seed-S` (skipping finished seeds) and write
    `out/aggregate.json`; returns `out`."""
    cfgs = seed_configs(config, overrides, seeds)
    folder = Path(out) if out is not None else default_run_dir(cfgs[seeds[0]].name)
    for seed in seeds:
        run_dir = seed_dir(folder, seed)
        if is_finished(run_dir):
            check_resumable(run_dir, cfgs[seed])
            log(f"seed {seed}: already finished in {run_dir} (summary.json): not re-run")
            continue
        after = continuable(run_dir, cfgs[seed])
        if after is not None:
            log(f"seed {seed}: continuing in {run_dir} after {after} (its checkpoint)")
        else:
            log(f"seed {seed}: running into {run_dir}")
        run_experiment(cfgs[seed], run_dir, resume=after is not None)
        log(f"seed {seed}: {metrics_line(run_dir)}")
    write_aggregate(folder, [seed_dir(folder, s) for s in seeds])
    return folder
