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
  mode on the int8 base;
- `lora-int8-backrazor0.1`: the same at keep 0.1, the other keep `device_memory.py`
  measures for every group;
- `lora-int8-ckpt-chunks4`: int8 base, checkpointing alone over 4 slices of the batch
  (557 MiB): exact gradients, so it trains as `lora-int8` up to dropout masks drawn
  slice by slice; one seed, to confirm that;
- `lora-int8-norm0.5-real`, `lora-int8-backrazor0.3-real`: `norm` 0.5 (the training of
  the 581-MiB checkpointed row) and `backrazor` 0.3 with `memory.keep_of = "real"`, so
  `keep` is a share of each sentence's real tokens, as at the 16 x 128 batches where the
  peaks are measured.

A LoRA row of `device_memory.py` trains as the arm with its base dtype and its sparse
mode: checkpointing changes no gradient (the recomputation replays the forward exactly;
tests/test_memory_checkpoint.py), nor does the allocator, so e.g. the `norm@0.1/int8`
row trains as `lora-int8-ckpt-norm0.1` does (over slices of the batch, up to dropout
masks drawn slice by slice). The table "device_memory LoRA rows" pairs every row with
its peak and that arm; a sparse mode on the fp32 or bf16 base has no arm of its own, and
the table names the int8 arm of the same mode as the nearest measured one and says so.

One budget for every arm: examples/sst2-centralized.toml (LoRA r8 on query, key, value
and the dense projections, 1,200 steps of 32, max 64 tokens, lr 1e-3), scored on the
872-sentence dev set (the same examples for every seed), 3 seeds. The allocator does not
change what is computed, so the accuracy arms run on the default one.

`--task bbc` runs the same arms on BBC News with `device_memory.py`'s minilm-lora batches
(16 articles x 128 tokens, every one real; 150 steps, lr 2e-3, the 444 test articles;
results `lora_low_memory_bbc.{json,md}`). `keep` is a share of a batch's padded length,
so on SST-2's short, uneven sentences the sparse modes keep most real tokens (keep 0.5:
86%, the summary measures it) and drop far less than at the 16 x 128 batches where their
peaks are measured; on BBC News they keep exactly `keep`, as there.

    nice .venv/bin/python benchmarks/lora_low_memory.py --parallel 2   # runs, resumable
    nice .venv/bin/python benchmarks/lora_low_memory.py --task bbc --parallel 2
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
import json
import math
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
    mean_pm,
    run,
    summarise,
    training_batches,
    write,
)
from device_memory import LORA, MINILM_BATCHES

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
    "lora-int8-backrazor0.1": (*INT8, 'memory.backward="backrazor"', "memory.keep=0.1"),
    "lora-int8-ckpt-chunks4": (*INT8, "memory.checkpoint=true", "memory.checkpoint_chunks=4"),
    # keep as a share of each sentence's real tokens (memory.keep_of = "real"): on SST-2
    # the modes then drop what `keep` says, as at device_memory's full-length batches
    # (checkpointing changes no gradient, so the norm arm runs without it, faster)
    "lora-int8-norm0.5-real": (*INT8, 'memory.backward="norm"', "memory.keep=0.5",
                               'memory.keep_of="real"'),
    "lora-int8-backrazor0.3-real": (*INT8, 'memory.backward="backrazor"', "memory.keep=0.3",
                                    'memory.keep_of="real"'),
}  # fmt: skip
# arms run at fewer seeds than the comparison's: a confirmation of a row that trains as
# another arm (checkpointing over 4 slices trains as lora-int8: exact gradients, dropout
# masks drawn slice by slice)
ARM_SEEDS: dict[str, tuple[int, ...]] = {"lora-int8-ckpt-chunks4": (0,)}
TARGET_POINTS = 1.0


# task -> (comparison name, config, sets every arm shares)
TASKS: dict[str, tuple[str, Path, tuple[str, ...]]] = {
    "sst2": ("lora_low_memory", ROOT / "examples" / "sst2-centralized.toml", ()),
    # device_memory.py's minilm-lora batches: 16 articles x 128 real tokens, no padding
    "bbc": (
        "lora_low_memory_bbc",
        ROOT / "examples" / "bbc-news-centralized.toml",
        (*MINILM_BATCHES, *LORA),
    ),
}


def comparison(task: str = "sst2", only: set[str] | None = None) -> Comparison:
    """Every arm against `lora`; with `only`, just those arms are run (all are summarised)."""
    name, config, shared = TASKS[task]
    arms = [Arm(arm, config, (*shared, *sets), seeds=ARM_SEEDS.get(arm))
            for arm, sets in ARMS.items() if not only or arm in only]  # fmt: skip
    pairs = [Pair(arm, "lora", "accuracy") for arm in ARMS if arm != "lora"]
    return Comparison(name, arms, pairs)


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


# (base dtype, sparse mode) -> the arm that trains so
TRAINS_AS = {
    ("fp32", ""): "lora",
    ("bf16", ""): "lora-bf16",
    ("int8", ""): "lora-int8",
    ("int8", "norm@0.1"): "lora-int8-ckpt-norm0.1",
    ("int8", "norm@0.5"): "lora-int8-ckpt-norm0.5",
    ("int8", "backrazor@0.3"): "lora-int8-backrazor0.3",
    ("int8", "backrazor@0.1"): "lora-int8-backrazor0.1",
}
DEVICE_MEMORY = OUT / "device_memory.json"
SHARE_BATCHES = 200


def real_token_share(task: str, keeps: list[float], batches: int = SHARE_BATCHES) -> dict[str, Any]:
    """The share of real (non-padding) token rows a sparse mode keeps on `task`'s training
    batches, per keep.

    `keep` is a share of the batch's padded length L (the longest sentence in the batch):
    every sample keeps ceil(keep * L) rows, real ones first. A sentence shorter than that
    keeps all its tokens, so on SST-2's uneven phrases the modes drop far less than
    `keep` says; on `device_memory.py`'s batches of 128 real tokens they keep exactly
    `keep`. (`backrazor` keeps the same share of a sample's elements, real rows first.)
    Measured on the first `batches` batches drawn as the arms' config draws them."""
    _, config, shared = TASKS[task]
    cfg, _, loader = training_batches(config, shared, batches)
    kept = dict.fromkeys(keeps, 0)
    real = lengths = seen = 0
    for batch in loader:
        mask = batch["attention_mask"]
        padded, n = mask.shape[1], mask.sum(1).tolist()
        for keep in keeps:
            rows = max(1, math.ceil(keep * padded - 1e-9))
            kept[keep] += sum(min(x, rows) for x in n)
        real += sum(n)
        lengths += padded * len(n)
        seen += 1
    return {"task": task, "batches": seen, "mean_real_tokens": real / (seen * cfg.train.batch_size),
            "mean_padded_length": lengths / (seen * cfg.train.batch_size),
            "share_kept": {str(k): kept[k] / real for k in keeps}}  # fmt: skip


def share_table(share: dict[str, Any]) -> list[str]:
    lines = ["### Real tokens the sparse modes keep on these batches", "",
             f"{share['task']} training batches ({share['batches']} of them): "
             f"{share['mean_real_tokens']:.1f} real tokens per sentence on average, padded "
             f"to {share['mean_padded_length']:.1f}. `keep` is a share of the padded length, "
             "so shorter sentences keep every token; at `device_memory.py`'s 16 x 128 real "
             "tokens the share kept is `keep` itself.", "",
             "| keep | share of real tokens kept |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.3f} |" for k, v in share["share_kept"].items()]
    return ["", *lines]


def accuracy_arm(row: str) -> tuple[str | None, str]:
    """The arm whose accuracy a `device_memory.py` LoRA row (`mode/dtype[/extra]`) has,
    and how: the same training, or the nearest arm measured."""
    mode, dtype, *extra = row.split("/")
    sparse = next((p for p in mode.split("+") if p != "checkpoint" and p != "none"), "")
    sliced = (
        " (dropout masks drawn per slice)" if any(e.startswith("chunks") for e in extra) else ""
    )
    if (dtype, sparse) in TRAINS_AS:
        return TRAINS_AS[dtype, sparse], "same training" + sliced
    if ("int8", sparse) in TRAINS_AS:
        return TRAINS_AS["int8", sparse], f"nearest: int8 base in place of {dtype}" + sliced
    return None, f"no arm trains {sparse} on any base"


def rows_table(data: dict[str, Any]) -> list[str]:
    """Every LoRA row of device_memory.json: its peak and the accuracy it trains to."""
    if not DEVICE_MEMORY.is_file():
        return []
    rows = json.loads(DEVICE_MEMORY.read_text())["groups"].get("minilm-lora", {})
    lines = ["### device_memory LoRA rows", "",
             "| row | peak RSS (MiB) | accuracy | arm | how |", "|---|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        arm, how = accuracy_arm(name)
        peak = f"{row['peak_rss_mib']:,.0f}" if row and row.get("peak_rss_mib") else "failed"
        acc = mean_pm(data["arms"][arm], "accuracy") if arm else None
        lines.append(f"| {name} | {peak} | {acc or 'not run yet'} | {arm or '-'} | {how} |")
    return ["", *lines]


def render(data: dict[str, Any]) -> str:
    lines = [f"## {data['comparison']}", "", "| arm | accuracy (mean ± 95% t-interval) |",
             "|---|---|"]  # fmt: skip
    lines += [f"| {name} | {describe(arm, 'accuracy')} |" for name, arm in data["arms"].items()]
    lines += ["", *differences_table(data["differences"], verdict), *rows_table(data)]
    if "real_token_share" in data:
        lines += share_table(data["real_token_share"])
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--summary-only", action="store_true", help="only summarise finished runs")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--only", default="", help="run only these arms (comma-separated)")
    p.add_argument("--task", choices=sorted(TASKS), default="sst2",
                   help="sst2 (uneven short texts) or bbc (device_memory.py's full 16 x 128 "
                        "batches)")  # fmt: skip
    args = p.parse_args()
    only = {a for a in args.only.split(",") if a}
    if unknown := only - set(ARMS):
        p.error(f"unknown arm(s) {sorted(unknown)}; the arms are {', '.join(ARMS)}")
    os.chdir(ROOT)  # the configs' data paths are relative to the repository
    comp = comparison(args.task)
    runs = args.out / comp.name
    failed = [] if args.summary_only else run(comparison(args.task, only), runs, args.parallel)
    data = summarise(comp, runs)
    data["verdict"] = [verdict(d) for d in data["differences"]]
    data["real_token_share"] = real_token_share(args.task, [0.1, 0.3, 0.5])
    data["failed"] = failed
    write(data, args.out / f"{comp.name}.json", render)


if __name__ == "__main__":
    main()
