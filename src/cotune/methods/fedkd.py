"""`fedkd`: fedlora plus a teacher on the server, which holds a public share of the
data; each round the averaged student adapter and the teacher distil into each other
on that share and the distilled adapter goes back (METHODS.md section 3, `[kd]`).

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
