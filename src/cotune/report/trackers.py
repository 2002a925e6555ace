"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed with the records
the run folder writes (`metrics.jsonl`: evaluations and rounds under `eval/`;
`train.jsonl`: training steps under `train/`), keyed by step (or round).

`runtime.loggers = ["tensorboard"]` writes event files to `RUN/tensorboard/`
(`tensorboard --logdir runs/`). MLflow logs to `MLFLOW_TRACKING_URI` when set, else to
`RUN/mlruns`; W&B runs offline (files under `RUN/wandb`) unless `WANDB_MODE` says
otherwise. The run's resolved config goes with it (TensorBoard: as text; MLflow and W&B:
as parameters). MLflow and W&B are optional installs; asking for one that is missing is
a `ConfigError` naming the package.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from cotune.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class Tracker(Protocol):
    def log(self, record: dict[str, Any], kind: str) -> None: ...
    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    step = int(record.get("step", record.get("round", 0)))
    values = {
        k: float(v)
        for k, v in record.items()
        if k not in ("step", "round") and isinstance(v, int | float) and not isinstance(v, bool)
        and math.isfinite(float(v))
    }  # fmt: skip
    return step, values


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any], config_text: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + config_text + "\n```")

    def log(self, record: dict[str, Any], kind: str) -> None:
        step, values = _scalars(record)
        for key, value in values.items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any], config_text: str) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=str(config.get("name") or run_dir.name))
        params = {k: str(v)[:500] for k, v in _flat(config).items()}
        mlflow.log_params(params)

    def log(self, record: dict[str, Any], kind: str) -> None:
        step, values = _scalars(record)
        self.mlflow.log_metrics({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Wandb:
    def __init__(self, run_dir: Path, config: dict[str, Any], config_text: str) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cotune"),
            name=str(config.get("name") or run_dir.name),
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
            reinit=True,
        )

    def log(self, record: dict[str, Any], kind: str) -> None:
        step, values = _scalars(record)
        self.run.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


_KINDS: dict[str, type] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}


def check_trackers(names: Sequence[str]) -> None:
    """A `ConfigError` naming what to install when a requested tracker's package is missing."""
    missing = [PACKAGES[n] for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        raise ConfigError(
            f"runtime.loggers asks for {', '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)}"
        )


def open_trackers(
    names: Sequence[str], run_dir: Path, config: dict[str, Any], config_text: str
) -> list[Tracker]:
    """The trackers `runtime.loggers` names, opened for one run folder."""
    check_trackers(names)
    return [_KINDS[name](run_dir, config, config_text) for name in dict.fromkeys(names)]
