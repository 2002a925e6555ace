"""The low-memory LoRA device, decided on accuracy: does minilm LoRA with an int8 frozen
base, activation checkpointing and `norm` keep 0.1 (the setting that peaks under 600
MiB in `device_memory.py` with the default allocator) stay within 1 point of plain LoRA
on SST-2?

One budget for both arms: examples/sst2-centralized.toml (LoRA r8 on query, key, value
and the dense projections, 1,200 steps of 32, max 64 tokens, lr 1e-3), scored on the
872-sentence dev set (the same examples for every seed), 3 seeds. The allocator does not
change what is computed, so the accuracy arm runs on the default one.

    nice .venv/bin/python benchmarks/lora_low_memory.py --parallel 2   # runs, resumable

About 6 core-hours on this machine (measured: about 35 min per plain LoRA run and 80 min
per low-memory run, which dequantises the int8 base per op and recomputes each layer);
an interrupted run continues from its last checkpoint (every 10 minutes).
    .venv/bin/python benchmarks/lora_low_memory.py --summary-only       # JSON + table

Writes benchmarks/results/lora_low_memory.json (+ .md); runs under
benchmarks/results/lora_low_memory/<arm>/seed-S with their per-example predictions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from comparison import (
    ROOT,
    Arm,
    Comparison,
    Pair,
    describe,
    differences_table,
    run,
    summarise,
    write,
)

OUT = ROOT / "benchmarks" / "results"
LOW_MEMORY = ('model.base_dtype="int8"', "memory.checkpoint=true", 'memory.backward="norm"',
              "memory.keep=0.1")  # fmt: skip
TARGET_POINTS = 1.0


def comparison() -> Comparison:
    config = ROOT / "examples" / "sst2-centralized.toml"
    return Comparison(
        "lora_low_memory",
        [Arm("lora", config, ()), Arm("lora-int8-ckpt-norm0.1", config, LOW_MEMORY)],
        [Pair("lora-int8-ckpt-norm0.1", "lora", "accuracy")],
    )


def verdict(diff: dict[str, Any]) -> str:
    if "mean" not in diff:
        return "not run yet"
    gap, wide = 100 * diff["mean"], diff.get("wider_interval")
    low = 100 * wide["low"] if wide else None
    if len(diff["seeds"]) < 3:
        return f"{gap:+.2f} points on {len(diff['seeds'])} seed(s): 3 are needed"
    if gap < -TARGET_POINTS:
        return f"not within {TARGET_POINTS} point: {gap:+.2f} points (mean of 3 seeds)"
    held = low is not None and low >= -TARGET_POINTS
    return f"within {TARGET_POINTS} point on the mean ({gap:+.2f})" + (
        "; the interval too" if held else f"; the interval reaches {low:+.2f}"
    )


def render(data: dict[str, Any]) -> str:
    lines = [f"## {data['comparison']}", "", "| arm | accuracy (mean ± 95% t-interval) |",
             "|---|---|"]  # fmt: skip
    lines += [f"| {name} | {describe(arm, 'accuracy')} |" for name, arm in data["arms"].items()]
    lines += ["", *differences_table(data["differences"], verdict)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--summary-only", action="store_true", help="only summarise finished runs")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    os.chdir(ROOT)  # the configs' data paths are relative to the repository
    comp = comparison()
    runs = args.out / comp.name
    failed = [] if args.summary_only else run(comp, runs, args.parallel)
    data = summarise(comp, runs)
    data["verdict"] = [verdict(d) for d in data["differences"]]
    data["failed"] = failed
    write(data, args.out / f"{comp.name}.json", render)


if __name__ == "__main__":
    main()
