"""Activation checkpointing beside the sparse modes: saved-activation peak, peak RSS and
step time of minilm full fine-tuning, per `[memory]` setting.

Arms (`ARMS`): none, checkpoint, norm keep 0.1, checkpoint + norm, backrazor keep 0.1,
checkpoint + backrazor. Each runs in a fresh process (so one arm's heap does not count in
another's RSS) with `MALLOC_MMAP_THRESHOLD_=65536` (glibc returns large blocks to the OS
on free, so RSS follows live memory): minilm (6 layers, hidden 384), AdamW, fp32, one
thread, random token batches of 16 x 128 (every token real, no padding), cotune's
`train_step` under `SavedTensorMeter` and `PeakRSS`. Memory is the max over steps 2..N
(step 1 also allocates Adam's state), time the median of steps 2..N.

    .venv/bin/python benchmarks/checkpoint_memory.py [--steps 4] [--arms none,checkpoint]

Writes benchmarks/results/checkpoint_memory.json and prints a markdown table.
`measure_arm` (one arm, in this process) and `measure` (arms in fresh processes) can be
reused by other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MiB = 1 << 20
MMAP_THRESHOLD = 1 << 16

# arm name -> [memory] section
ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "checkpoint": {"backward": "checkpoint"},
    "norm@0.1": {"backward": "norm", "keep": 0.1},
    "checkpoint+norm@0.1": {"backward": "norm", "keep": 0.1, "checkpoint": True},
    "backrazor@0.1": {"backward": "backrazor", "keep": 0.1},
    "checkpoint+backrazor@0.1": {"backward": "backrazor", "keep": 0.1, "checkpoint": True},
}


def measure_arm(
    memory: dict[str, Any],
    *,
    model_name: str = "minilm",
    steps: int = 4,
    batch: int = 16,
    seq: int = 128,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Train `model_name` for `steps` steps with the `[memory]` section `memory`, in this
    process; per step: the saved-for-backward peak (`SavedTensorMeter.peak_bytes`), what
    the forward pass kept and the largest one-layer recomputation, peak RSS and time."""
    import torch

    from cotune.config import MemoryConfig, build_config
    from cotune.memory import PeakRSS, SavedTensorMeter, apply_memory_option
    from cotune.models import build_classifier
    from cotune.training import make_optimizer, train_step

    torch.set_num_threads(threads)
    cfg = build_config({"model": {"name": model_name}, "train": {"lr": 5e-5}})
    model, _, _ = build_classifier(cfg.model, 5, seed=seed)
    mem = MemoryConfig(**memory)
    apply_memory_option(model, mem, seed=seed)
    optimizer = make_optimizer(model.parameters(), cfg)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed)
    model.train()
    per_step: dict[str, list[float]] = {
        k: [] for k in ("saved_peak_bytes", "forward_kept_bytes", "recompute_bytes",
                        "peak_rss_bytes", "step_s")
    }  # fmt: skip
    for _ in range(steps):
        b = {
            "input_ids": torch.randint(1000, 29000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 5, (batch,), generator=g),
        }
        meter = SavedTensorMeter(params)
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            train_step(model, b, optimizer, None, max_grad_norm=1.0, meter=meter)
        per_step["step_s"].append(time.perf_counter() - t0)
        per_step["saved_peak_bytes"].append(meter.peak_bytes)
        per_step["forward_kept_bytes"].append(meter.bytes)
        per_step["recompute_bytes"].append(meter.recompute_bytes)
        per_step["peak_rss_bytes"].append(rss.peak_bytes)
    later = slice(1, None) if steps > 1 else slice(None)
    return {
        "memory": mem.model_dump(),
        "saved_activation_bytes": max(per_step["saved_peak_bytes"][later]),
        "forward_kept_bytes": max(per_step["forward_kept_bytes"][later]),
        "recompute_bytes": max(per_step["recompute_bytes"][later]),
        "peak_rss_bytes": max(per_step["peak_rss_bytes"][later]),
        "step_s": statistics.median(per_step["step_s"][later]),
        "per_step": per_step,
    }


def measure(arms: list[str], *, steps: int = 4, threads: int = 1) -> dict[str, Any]:
    """`measure_arm` for each of `arms` (names in `ARMS`), each in a fresh process with
    glibc's mmap threshold at 64 KiB; adds ratios to `none` when it is among them."""
    out: dict[str, Any] = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    for arm in arms:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", arm, "--steps", str(steps),
               "--threads", str(threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"worker failed: {arm}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        out[arm] = res
        print(f"  {arm:26s} saved peak {res['saved_activation_bytes'] / MiB:7.1f} MiB  "
              f"peak RSS {res['peak_rss_bytes'] / MiB:6.0f} MiB  step {res['step_s']:.2f} s  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if "none" in out:
        base = out["none"]
        for res in out.values():
            res["saved_ratio_to_none"] = (
                res["saved_activation_bytes"] / base["saved_activation_bytes"]
            )
            res["step_time_ratio_to_none"] = res["step_s"] / base["step_s"]
    return out


def table(res: dict[str, Any]) -> str:
    lines = [
        "| memory | saved for backward, peak (MiB) | of which recompute (MiB) | vs none "
        "| peak RSS (MiB) | step time (s) | vs none |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in res.items():
        ratio = r.get("saved_ratio_to_none")
        t_ratio = r.get("step_time_ratio_to_none")
        lines.append(
            f"| {arm} | {r['saved_activation_bytes'] / MiB:.1f} | "
            f"{r['recompute_bytes'] / MiB:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} | {r['peak_rss_bytes'] / MiB:.0f} | "
            f"{r['step_s']:.2f} | {'-' if t_ratio is None else f'{t_ratio:.2f}x'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", default=str(RESULTS / "checkpoint_memory.json"))
    ap.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure_arm(ARMS[a.worker], steps=a.steps, threads=a.threads)))
        return
    t0 = time.perf_counter()
    res = measure(a.arms.split(","), steps=a.steps, threads=a.threads)
    doc = {
        "setup": {
            "model": "minilm (all-MiniLM-L6-v2, 6 layers), full fine-tuning, AdamW, fp32",
            "batch": "16 x 128 random tokens, all real (no padding)",
            "threads": a.threads,
            "steps": a.steps,
            "allocator": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}, one process per arm",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other "
            "jobs: times are indicative",
        },
        "arms": res,
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(res))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
