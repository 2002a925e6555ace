"""`cotune demo`: run every config of a folder, one row each, then the comparison page.

`demo_configs` checks the whole folder before anything trains (a folder with no
`*.toml`, or any config that does not validate, is a UserError naming it), `run_demo`
runs each config into `OUT/<config file stem>/` (a fresh run folder each time) and
writes `OUT/index.html` with `report.demo.write_demo_page`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cotune.config import Config
from cotune.errors import ConfigError, UserError
from cotune.report.demo import write_demo_page
from cotune.runtime.experiment import load_experiment, run_experiment

DEFAULT_CONFIGS = Path("examples/demo")
DEFAULT_OUT = Path("runs/demo")


@dataclass
class DemoResult:
    """What `run_demo` wrote: the page, the run folders in row order, the seconds each
    row took (run, plot and report included) and the whole demo's seconds."""

    page: Path
    rows: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0


def demo_configs(folder: str | Path, sets: list[str] | None = None) -> list[tuple[str, Config]]:
    """The rows of the demo in `folder`: (row name, validated config with the `sets`
    overrides) for each `*.toml` in file-name order. Every config is loaded before any
    runs, so a bad one stops the demo at once."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(
            f"demo folder {str(path)!r} does not exist or is not a folder: give a folder of "
            "cotune TOML configs, one per row (the default is examples/demo)"
        )
    files = sorted(path.glob("*.toml"))
    if not files:
        raise ConfigError(
            f"demo folder {str(path)!r} holds no *.toml config: put one cotune config per "
            "row there (see examples/demo)"
        )
    rows = []
    for file in files:
        try:
            rows.append((file.stem, load_experiment(file, sets)))
        except UserError as err:
            raise ConfigError(f"demo row {file.name}: {err}") from err
    return rows


def run_demo(
    folder: str | Path = DEFAULT_CONFIGS,
    out: str | Path = DEFAULT_OUT,
    *,
    sets: list[str] | None = None,
    on_row: Callable[[str, Path, float], None] | None = None,
) -> DemoResult:
    """Run every config of `folder` (with `sets` overrides applied to each) into
    `out/<row>` and write `out/index.html`; `on_row(row, run_dir, seconds)` is called
    after each row."""
    out = Path(out)
    rows = demo_configs(folder, sets)
    start = time.perf_counter()
    result = DemoResult(page=out, rows=[])
    for name, cfg in rows:
        t0 = time.perf_counter()
        path = run_experiment(cfg, out / name)
        result.seconds[name] = time.perf_counter() - t0
        result.rows.append(path)
        if on_row is not None:
            on_row(name, path, result.seconds[name])
    result.total_s = time.perf_counter() - start
    timing = ", ".join(f"{n} {s:.0f} s" for n, s in result.seconds.items())
    result.page = write_demo_page(
        out,
        result.rows,
        title="cotune demo",
        intro=_intro(rows),
        notes=[f"Seconds per row on this machine (training, evaluation, report): {timing}."],
    )
    return result


def _intro(rows: list[tuple[str, Config]]) -> str:
    models = sorted({cfg.model.name for _, cfg in rows})
    tasks = sorted({cfg.task.name for _, cfg in rows})
    methods = ", ".join(cfg.method for _, cfg in rows)
    return (
        f"{' / '.join(models)} on {' / '.join(tasks)}, trained {len(rows)} ways ({methods}): "
        "what each reaches, and what it costs on the wire, in device memory and in time."
    )
