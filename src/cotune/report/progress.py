"""One line per evaluation or round on stderr, as it happens (a terminal or a pipe).

`cotune run` prints, for every record written to `metrics.jsonl`:

    [eval] step 250/1000  accuracy=0.9123 loss=0.3120  up 12.3 MB  down 4.5 MB  1m20s, ETA 4m00s

`--quiet` (environment `COTUNE_PROGRESS=0`, which child processes inherit) turns the
lines and the step bars off.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from cotune.training.loop import progress_enabled

_SKIP = {"step", "round", "bytes_up", "bytes_down", "wall_s", "epoch"}


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_line(record: dict[str, Any], total: int | None) -> str:
    """The line for one metrics.jsonl record (`total`: steps or rounds in the run)."""
    unit = "round" if "round" in record else "step"
    at = int(record.get(unit, 0))
    where = f"{unit} {at}/{total}" if total else f"{unit} {at}"
    metrics = " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in record.items()
        if k not in _SKIP and isinstance(v, int | float) and not k.startswith(("round_", "clients_", "proxy_", "realign_"))
        and not k.endswith("_params")
    )  # fmt: skip
    wall = float(record.get("wall_s", 0.0))
    eta = f", ETA {_duration(wall / at * (total - at))}" if total and 0 < at < total else ""
    traffic = (
        f"up {_bytes(record.get('bytes_up') or 0)}  down {_bytes(record.get('bytes_down') or 0)}"
    )
    return f"[eval] {where}  {metrics}  {traffic}  {_duration(wall)}{eta}".replace("    ", "  ")


def echo(
    total: int | None, stream: TextIO | None = None
) -> Callable[[dict[str, Any]], None] | None:
    """A `RunFolder` echo printing `format_line` to stderr (None when progress is off)."""
    if not progress_enabled():
        return None

    def write(record: dict[str, Any]) -> None:
        out = stream or sys.stderr
        print(format_line(record, total), file=out, flush=True)

    return write
