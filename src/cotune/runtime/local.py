"""Running one experiment in this process: config -> method -> run folder."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cotune.config import Config, to_toml
from cotune.methods import get_method
from cotune.report import RunFolder, default_run_dir, finish_run


def offline_env() -> None:
    """Models and data never come from a hub unless the user allows it explicitly."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_experiment(cfg: Config, out: str | Path | None = None) -> Path:
    """Run `cfg` and write its run folder; returns the folder's path."""
    offline_env()
    method = get_method(cfg.method)
    run = RunFolder(out if out is not None else default_run_dir(cfg.name))
    run.write_config(to_toml(cfg))
    t0 = time.perf_counter()
    result = method(cfg, run, run_dir=run.path)
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
