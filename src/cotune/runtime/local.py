"""Running one experiment in this process: config -> method -> run folder."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any

from cotune.config import Config, to_toml
from cotune.errors import ConfigError
from cotune.methods import get_method
from cotune.report import RunFolder, default_run_dir, finish_run


def offline_env() -> None:
    """Models and data never come from a hub unless the user allows it explicitly."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # no "Loading weights" bars (transformers reads this when imported); cotune shows its
    # own progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run_experiment(cfg: Config, out: str | Path | None = None, resume: bool = False) -> Path:
    """Run `cfg` and write its run folder; returns the folder's path.

    With `resume`, `out` is an existing run folder and the method continues from its
    last checkpoint (methods whose `run` takes `resume`: the federated ones).
    """
    offline_env()
    method = get_method(cfg.method)
    if resume and "resume" not in inspect.signature(method).parameters:
        raise ConfigError(
            f"method {cfg.method!r} cannot resume a run; resumable methods: "
            "fedavg, fedlora, fedkd. Start it again without --resume."
        )
    run = RunFolder(out if out is not None else default_run_dir(cfg.name))
    if not resume:
        run.start_fresh()
    run.write_config(to_toml(cfg))
    t0 = time.perf_counter()
    result = method(cfg, run, run_dir=run.path, **({"resume": True} if resume else {}))
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "method": cfg.method,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "metrics": result.metrics,
        "comm": {"bytes_up": result.bytes_up, "bytes_down": result.bytes_down},
        "wall_s": wall,
        "device_peak_bytes": result.device_peak_bytes,
        "trainable_params": {"device": result.trainable_device, "cloud": result.trainable_cloud},
        "saved_activation_bytes": result.saved_activation_bytes,
        "seed": cfg.seed,
        "name": cfg.name,
        **result.extra,
    }
    run.write_summary(summary)
    finish_run(run)
    return run.path
