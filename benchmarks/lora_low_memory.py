"""The low-memory LoRA device, decided on accuracy: does minilm LoRA with an int8 frozen
base and a memory mode that peaks under 600 MiB stay within 1 point of plain LoRA on
SST-2?

Arms (peak RSS at 16 x 128 tokens from `device_memory.py` and `cotune memory`, default
allocator):
- `lora`: plain LoRA, fp32 base (1,299 MiB), the reference;
- `lora-int8-ckpt-norm0.1`: int8 base, checkpointing, `norm` keep 0.1 (555 MiB);
- `lora-int8-ckpt-norm0.5`: int8 base, checkpointing, `norm` keep 0.5 (581 MiB). With
  checkpointing only the layer inputs are saved, so the keep fraction costs memory only
  inside the recomputed layer: a larger keep for little memory;
- `lora-int8`: int8 base, no memory mode (1,246 MiB), to tell the base's cost from the
  memory mode's;
- `lora-bf16`: bf16 base, no memory mode (1,267 MiB): the other low-memory base;
- `lora-int8-backrazor0.3`: int8 base, `backrazor` keep 0.3 (674 MiB): BackRazor's own
  mode on the int8 base.

Together they give an accuracy to every LoRA row of `device_memory.py`: a row's
accuracy is set by its base dtype and its sparse mode, because checkpointing changes no
gradient (the recomputation replays the forward exactly; tests/test_memory_checkpoint.py),
so e.g. the `norm@0.1/int8` row trains as `lora-int8-ckpt-norm0.1` does.

One budget for every arm: examples/sst2-centralized.toml (LoRA r8 on query, key, value
and the dense projections, 1,200 steps of 32, max 64 tokens, lr 1e-3), scored on the
872-sentence dev set (the same examples for every seed), 3 seeds. The allocator does not
change what is computed, so the accuracy arms run on the default one.

    nice .venv/bin/python benchmarks/lora_low_memory.py --parallel 2   # runs, resumable
    nice .venv/bin/python benchmarks/lora_low_memory.py --only lora-int8-ckpt-norm0.5
    .venv/bin/python benchmarks/lora_low_memory.py --summary-only       # JSON + table

Runs go seed by seed (seed 0 of every arm first). About 55 min per run of `lora` or
`lora-int8` and 100 min per checkpointed run on this machine with two runs at a time;
an interrupted run continues from its last checkpoint (every 10 minutes).

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
INT8 = ('model.base_dtype="int8"',)
CHECKPOINT_NORM = ("memory.checkpoint=true", 'memory.backward="norm"')
ARMS = {
    "lora": (),
    "lora-int8-ckpt-norm0.1": (*INT8, *CHECKPOINT_NORM, "memory.keep=0.1"),
    "lora-int8-ckpt-norm0.5": (*INT8, *CHECKPOINT_NORM, "memory.keep=0.5"),
    "lora-int8": INT8,
    "lora-bf16": ('model.base_dtype="bf16"',),
    "lora-int8-backrazor0.3": (*INT8, 'memory.backward="backrazor"', "memory.keep=0.3"),
}
TARGET_POINTS = 1.0


def comparison(only: set[str] | None = None) -> Comparison:
    """Every arm against `lora`; with `only`, just those arms are run (all are summarised)."""
    config = ROOT / "examples" / "sst2-centralized.toml"
    arms = [Arm(name, config, sets) for name, sets in ARMS.items() if not only or name in only]
    pairs = [Pair(name, "lora", "accuracy") for name in ARMS if name != "lora"]
    return Comparison("lora_low_memory", arms, pairs)


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
    p.add_argument("--only", default="", help="run only these arms (comma-separated)")
    args = p.parse_args()
    only = {a for a in args.only.split(",") if a}
    if unknown := only - set(ARMS):
        p.error(f"unknown arm(s) {sorted(unknown)}; the arms are {', '.join(ARMS)}")
    os.chdir(ROOT)  # the configs' data paths are relative to the repository
    comp = comparison()
    runs = args.out / comp.name
    failed = [] if args.summary_only else run(comparison(only), runs, args.parallel)
    data = summarise(comp, runs)
    data["verdict"] = [verdict(d) for d in data["differences"]]
    data["failed"] = failed
    write(data, args.out / f"{comp.name}.json", render)


if __name__ == "__main__":
    main()
