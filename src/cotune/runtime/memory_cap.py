"""`memory.max_device_mib` (`--max-memory`): refuse, before training, a run whose device
would not fit, and say what would.

The need is measured, not estimated: `cotune memory` on the same config, in a process of
its own (so this process's imports and history do not count), for a few steps of full
batches. Above the cap, a handful of alternatives (sparse saving, activation
checkpointing, both, checkpointed layers over 4 slices of the batch, half the batch, an
int8 frozen base for LoRA) are measured the same way, two at a time, and the message
lists those that fit. Under the cap, a process that
is the device alone (a centralized run, a split device process) gets the cap for `fit`,
which checks every step's peak; where devices share a process with a cloud or a server
(in-process split, federated simulation) only the measurement before training applies.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cotune.config import Config, to_toml
from cotune.memory.cap import MemoryCapExceeded, MiB, set_memory_cap
from cotune.report.memory import device_breakdown
from cotune.runtime.launcher import cotune_command

log = logging.getLogger(__name__)
PROBE_STEPS = 2
CHECKED_ENV = "COTUNE_MEMORY_CAP_CHECKED"  # the cap (bytes) a parent process measured
PROBE_TIMEOUT_S = 1800.0


def probe_config(cfg: Config) -> Config:
    """`cfg` as a probe runs it: no cap (no recursion), no remote cloud (a device of a
    remote cloud measures against a loopback cloud of its own: the cloud's state is
    not touched), no token file."""
    data = cfg.model_copy(deep=True)
    data.memory.max_device_mib = None
    data.runtime.cloud = None
    data.runtime.tokens = None
    return data


def alternatives(cfg: Config) -> dict[str, list[str]]:
    """What a user could change to need less memory, as `--set`s (those not already on)."""
    out: dict[str, list[str]] = {}
    m = cfg.memory
    if m.backward == "none":
        out['memory.backward = "norm", memory.keep = 0.1'] = [
            'memory.backward="norm"',
            "memory.keep=0.1",
        ]
    if not m.checkpoint:
        out["memory.checkpoint = true"] = ["memory.checkpoint=true"]
    if m.backward == "none" and not m.checkpoint:
        out['memory.checkpoint = true with memory.backward = "norm", keep 0.1'] = [
            "memory.checkpoint=true", 'memory.backward="norm"', "memory.keep=0.1"]  # fmt: skip
    if m.checkpoint and m.checkpoint_chunks == 1 and cfg.train.batch_size >= 4:
        out["memory.checkpoint_chunks = 4"] = ["memory.checkpoint_chunks=4"]
    if cfg.model.lora is not None and cfg.model.base_dtype == "fp32" and cfg.method != "fedpft":
        out['model.base_dtype = "int8"'] = ['model.base_dtype="int8"']
    if cfg.train.batch_size >= 2:
        half = cfg.train.batch_size // 2
        out[f"train.batch_size = {half}"] = [f"train.batch_size={half}"]
    return out


def measure_need(
    cfg: Config, sets: list[str] | None = None, steps: int = PROBE_STEPS
) -> int | None:
    """Peak RSS (bytes) of `cfg`'s device process over `steps` training steps, measured by
    `cotune memory` in a child process; None if the probe failed."""
    with tempfile.TemporaryDirectory(prefix="cotune-memprobe-") as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(to_toml(probe_config(cfg)))
        args = ["memory", str(config), "--steps", str(steps), "--out", str(Path(tmp) / "run")]
        for s in sets or []:
            args += ["--set", s]
        try:
            done = subprocess.run(cotune_command(*args), capture_output=True, text=True,
                                  timeout=PROBE_TIMEOUT_S, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return None
        summary = Path(tmp) / "run" / "summary.json"
        if done.returncode != 0 or not summary.is_file():
            log.warning("memory probe failed (%s): %s", sets, done.stderr[-2000:])
            return None
        data = json.loads(summary.read_text())
        breakdown = device_breakdown(data)
        peak = breakdown["peak_rss"] if breakdown else data.get("device_peak_bytes")
        return int(peak) if peak else None


def apply_memory_cap(cfg: Config, device_process: bool) -> None:
    """`memory.max_device_mib` for this run: measured once per run tree (a child started
    by a run that was measured inherits `CHECKED_ENV` and is not measured again), then,
    in a process that is the device alone (`device_process`), the cap `fit` checks."""
    if cfg.memory.max_device_mib is None:
        set_memory_cap(None)
        return
    cap = int(cfg.memory.max_device_mib * MiB)
    if os.environ.get(CHECKED_ENV) != str(cap):
        check_need(cfg)
        os.environ[CHECKED_ENV] = str(cap)  # children (split devices) inherit it
    set_memory_cap(cap if device_process else None)


def check_need(cfg: Config) -> None:
    """Measure `cfg`'s need against `memory.max_device_mib`; raise `MemoryCapExceeded`
    naming the cap, the need and the alternatives measured to fit."""
    assert cfg.memory.max_device_mib is not None
    cap = int(cfg.memory.max_device_mib * MiB)
    print(f"cotune: measuring the device's memory need against its cap of {cap / MiB:,.0f} MiB "
          f"({PROBE_STEPS} steps in a process of its own) ...", flush=True)  # fmt: skip
    need = measure_need(cfg)
    if need is None:
        raise MemoryCapExceeded(
            "could not measure the device's memory need (the measuring run failed; run "
            "`cotune memory CONFIG` to see why), so the cap of "
            f"{cap / MiB:,.0f} MiB cannot be checked; fix the config or drop --max-memory"
        )
    if need <= cap:
        print(f"cotune: the device needs {need / MiB:,.0f} MiB, within its cap of "
              f"{cap / MiB:,.0f} MiB", flush=True)  # fmt: skip
        return
    options = alternatives(cfg)
    with ThreadPoolExecutor(max_workers=2) as pool:
        needs = dict(
            zip(options, pool.map(lambda s: measure_need(cfg, s), options.values()), strict=True)
        )
    fits = [
        f"{name} ({n / MiB:,.0f} MiB)" for name, n in needs.items() if n is not None and n <= cap
    ]
    over = [
        f"{name} ({n / MiB:,.0f} MiB)" for name, n in needs.items() if n is not None and n > cap
    ]
    raise MemoryCapExceeded(
        f"this run needs {need / MiB:,.0f} MiB on the device (peak RSS of {PROBE_STEPS} "
        f"measured training steps), above its cap of {cap / MiB:,.0f} MiB "
        "(memory.max_device_mib, --max-memory); nothing was trained. "
        + (
            f"Options measured to fit: {'; '.join(fits)}. "
            if fits
            else "No single option measured fits. "
        )
        + (f"Measured but still over the cap: {'; '.join(over)}. " if over else "")
        + "`cotune memory CONFIG` shows where the memory goes."
    )
