"""`fedlora`: clients train LoRA adapters and the classifier head; only those travel
and are averaged, weighted by examples (METHODS.md section 3).

Runs on Flower (`cotune.runtime.federated`): simulation or deployment engine per
`runtime.engine`."""

from __future__ import annotations

from pathlib import Path

from cotune.config import Config
from cotune.methods.result import MethodResult, Recorder


def run(
    cfg: Config, recorder: Recorder, run_dir: str | Path | None = None, resume: bool = False
) -> MethodResult:
    from cotune.runtime.federated import run_federated

    return run_federated(cfg, recorder, run_dir, resume=resume)
