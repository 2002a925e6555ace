"""`cotune memory CONFIG`: a short run of CONFIG with `memory.report = true`, and the
breakdown of the device process's peak RSS it measured.

The run is the method's own (same model, optimizer, memory option, batch), shortened
to `steps` training steps and a small evaluation. Split methods run their device as a
process of its own (loopback gRPC) so that the cloud's model is not in the device's
RSS. Federated methods are measured through their client model trained the same way in
one place (`method = "centralized"` with the same model, LoRA and memory settings),
except fedpft, whose device trains a proxy: that one is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotune.config import Config
from cotune.errors import UserError
from cotune.methods import get_spec
from cotune.report import default_run_dir, read_summary
from cotune.report.memory import device_breakdown
from cotune.runtime.experiment import load_experiment, run_experiment

EVAL_EXAMPLES = 16


def memory_config(config: str | Path | None, overrides: list[str], steps: int) -> Config:
    """CONFIG with the memory report on and a budget of `steps` steps."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    cfg = load_experiment(config, overrides)
    kind = get_spec(cfg.method).kind
    sets = [*overrides, "memory.report=true", f"train.steps={steps}", "runtime.export=false"]
    if kind == "federated":
        if cfg.method == "fedpft":
            raise UserError(
                "cotune memory cannot measure fedpft's devices yet: they train a proxy the "
                "cloud builds each round; measure one client round with "
                "`cotune run CONFIG --set memory.report=true` (simulation engine) instead"
            )
        sets.append("method=centralized")
    elif kind == "split" and cfg.runtime.cloud is None:
        sets.append('runtime.transport="grpc"')
    limit = min(cfg.task.max_eval_examples or EVAL_EXAMPLES, EVAL_EXAMPLES)
    sets.append(f"task.max_eval_examples={limit}")
    return load_experiment(config, sets)


def measure_memory(
    config: str | Path | None,
    overrides: list[str],
    *,
    steps: int = 5,
    out: str | Path | None = None,
) -> tuple[Path, dict[str, Any] | None]:
    """Run the short measurement; returns the run folder and its breakdown."""
    cfg = memory_config(config, overrides, steps)
    path = run_experiment(cfg, out if out is not None else default_run_dir(f"{cfg.name}-memory"))
    return path, device_breakdown(read_summary(path))
