"""The planner's fitted constants and where they come from.

`calibration.json` beside this module is written by `benchmarks/plan_check.py` (fitted on
a subset of its real runs, checked on the rest); without it the constants are the
uncalibrated model (activations and compute counted at face value). The runtime at rest
is the median `runtime_at_rest` of `benchmarks/results/device_memory.json` (cotune's
`cotune memory` breakdowns) when that file is there.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from cotune.planner.evidence import RESULTS

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
DEFAULT_RUNTIME_MIB = 395.0  # README "Device memory for real", used only without the results


@dataclass(frozen=True)
class Calibration:
    runtime_mib: float
    """The device process at rest (interpreter, torch, cotune), MiB."""
    saved_scale: float = 1.0
    """Peak share of the saved activations plus the transients that scale with them."""
    grad_scale: float = 1.0
    """Share of the gradients alive at the peak."""
    overhead_mib: float = 0.0
    """Data, allocator retention and other memory not modelled, MiB."""
    flops_scale: float = 1.0
    """Measured step compute over FLOPs / GFLOP/s."""
    per_mparam_s: float = 0.0
    """Seconds per million trainable parameters per step (optimizer, clipping)."""
    source: str = "model: uncalibrated"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def runtime_floor() -> tuple[float, str]:
    """The measured runtime at rest (MiB) and its source."""
    path = RESULTS / "device_memory.json"
    if path.is_file():
        data = json.loads(path.read_text())
        values = [
            row["breakdown_mib"]["runtime_at_rest"]
            for group in data.get("groups", {}).values()
            for row in group.values()
            if row.get("breakdown_mib", {}).get("runtime_at_rest")
        ]
        if values:
            return statistics.median(values), "measured: benchmarks/results/device_memory.json"
    return DEFAULT_RUNTIME_MIB, "model: README's 395 MiB runtime at rest"


def load_calibration() -> Calibration:
    floor, _ = runtime_floor()
    if CALIBRATION_FILE.is_file():
        data = json.loads(CALIBRATION_FILE.read_text())
        data["runtime_mib"] = floor
        return Calibration(**data)
    return Calibration(runtime_mib=floor)


def save_calibration(cal: Calibration) -> None:
    data = cal.as_dict()
    data.pop("runtime_mib")
    CALIBRATION_FILE.write_text(json.dumps(data, indent=2) + "\n")
