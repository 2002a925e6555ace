"""SFT's claim, decided: how many times fewer bytes than the full-width cut, and at what
cost in accuracy against centralized fine-tuning, over several seeds.

Two tasks, each on one budget for every arm (minilm, full fine-tuning on both sides of
the cut, the same steps, batch, sequence cap, LR and schedule):

- `sst2`: SST-2, 1,000 steps of 32 phrases (max 64 tokens, lr 1e-4), scored on the full
  872-sentence dev set (the same examples for every seed);
- `bbc-news`: BBC News, 150 steps of 16 articles (max 128 tokens, lr 5e-5), scored on
  each seed's 444-article held-out split (the split follows the run seed).

Arms: `centralized`; `sft8-int8-cutC`, split at layer C with the SFT cut (layer C's
first FFN matrix factorised at rank 8; the 8-value code per token and its gradient sent
as int8 with a float32 scale per token); `identity-cut4`, the full-width fp32 cut, one
seed: the byte count the ratio is taken against (the same batches, so the same tokens).

The target (SFT's "96x less traffic with little impact"): at least 100x fewer bytes than
`identity` (both directions, the whole run, evaluation included) within 1.0 point of
centralized, mean of 3 seeds.

    nice .venv/bin/python benchmarks/split_sft.py --task sst2 --parallel 2   # runs, resumable
    .venv/bin/python benchmarks/split_sft.py --task sst2 --summary-only       # JSON + table

Writes benchmarks/results/split_sft/<task>.json (+ .md); the runs stay under
benchmarks/results/split_sft/<task>/<arm>/seed-S with their per-example predictions.
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

OUT = ROOT / "benchmarks" / "results" / "split_sft"
SFT8_INT8 = ('link.codec="sft"', "link.rank=8", 'link.code_format="int8"')
IDENTITY = ('link.codec="identity"', 'link.code_format="fp32"')


def sst2() -> Comparison:
    config = ROOT / "examples" / "sst2-split-sft.toml"
    budget = ('name="sst2-sft-1000x32"', "train.steps=1000", "train.batch_size=32",
              "train.lr=1e-4", "train.eval_every=250", "split.cut=4", *SFT8_INT8)  # fmt: skip
    return Comparison(
        "sst2",
        [
            Arm("centralized", config, (*budget, "method=centralized")),
            Arm("sft8-int8-cut4", config, (*budget, "method=split")),
            Arm("identity-cut4", config, (*budget, "method=split", *IDENTITY), seeds=(0,)),
        ],
        [Pair("sft8-int8-cut4", "centralized", "accuracy")],
    )


def bbc_news() -> Comparison:
    central = ROOT / "examples" / "bbc-news-centralized.toml"
    split = ROOT / "benchmarks" / "configs" / "bbc-news-split-sft8-int8.toml"
    return Comparison(
        "bbc-news",
        [
            Arm("centralized", central, ("train.eval_every=150",)),
            Arm("sft8-int8-cut3", split, ("split.cut=3",)),
            Arm("sft8-int8-cut4", split, ("split.cut=4",)),
            Arm("identity-cut4", split, ("split.cut=4", *IDENTITY), seeds=(0,)),
        ],
        [
            Pair("sft8-int8-cut3", "centralized", "accuracy"),
            Pair("sft8-int8-cut4", "centralized", "accuracy"),
        ],
    )


COMPARISONS = {"sst2": sst2, "bbc-news": bbc_news}
TARGET_RATIO = 100.0
TARGET_POINTS = 1.0


def verdicts(data: dict[str, Any]) -> dict[str, Any]:
    """Per SFT arm: the byte ratio against identity and whether the target holds."""
    arms = data["arms"]
    identity = arms.get("identity-cut4", {}).get("bytes_mean")
    out: dict[str, Any] = {}
    for diff in data["differences"]:
        sft = arms[diff["a"]]
        ratio = identity / sft["bytes_mean"] if identity and sft.get("bytes_mean") else None
        gap = 100 * diff["mean"] if "mean" in diff else None
        wide = diff.get("wider_interval")
        within = gap is not None and gap >= -TARGET_POINTS
        out[diff["a"]] = {
            "bytes_ratio_vs_identity": ratio,
            "gap_points": gap,
            "gap_interval_points": [100 * wide["low"], 100 * wide["high"]] if wide else None,
            "seeds": diff["seeds"],
            "target_met": bool(
                ratio and ratio >= TARGET_RATIO and within and len(diff["seeds"]) >= 3
            ),
            "interval_excludes_more_than_1_point_loss": bool(
                wide and 100 * wide["low"] >= -TARGET_POINTS
            ),
        }
    return out


def render(data: dict[str, Any]) -> str:
    lines = [
        f"## split_sft: {data['comparison']}",
        "",
        "| arm | accuracy (mean ± 95% t-interval) | bytes (MB, both directions) | x fewer than identity |",
        "|---|---|---|---|",
    ]
    identity = data["arms"].get("identity-cut4", {}).get("bytes_mean")
    for name, arm in data["arms"].items():
        b = arm.get("bytes_mean")
        ratio = f"{identity / b:.1f}" if identity and b else "-"
        mb = "-" if not arm["seeds"] else f"{b / 1e6:.2f}" if b else "0 (no link)"
        lines.append(f"| {name} | {describe(arm, 'accuracy')} | {mb} | {ratio} |")
    lines += ["", *differences_table(data["differences"])]
    lines.append("")
    for arm, v in data["verdicts"].items():
        if v["gap_points"] is None:
            continue
        ratio = v["bytes_ratio_vs_identity"]
        iv = v["gap_interval_points"]
        lines.append(
            f"- {arm}: {f'{ratio:.1f}x' if ratio else 'n/a (identity not run yet)'} fewer bytes "
            f"than identity, {v['gap_points']:+.2f} points against centralized "
            f"({len(v['seeds'])} seeds; wider interval "
            f"{f'[{iv[0]:+.2f}, {iv[1]:+.2f}]' if iv else 'n/a'}): target "
            f"({TARGET_RATIO:.0f}x within {TARGET_POINTS} point, mean of 3 seeds) "
            f"{'met' if v['target_met'] else 'not met'}"
            + (
                "; the interval also excludes a loss over 1 point"
                if v["interval_excludes_more_than_1_point_loss"]
                else ""
            )
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=sorted(COMPARISONS), required=True)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--summary-only", action="store_true", help="only summarise finished runs")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    os.chdir(ROOT)  # the configs' data paths are relative to the repository
    comparison = COMPARISONS[args.task]()
    runs = args.out / comparison.name
    failed = [] if args.summary_only else run(comparison, runs, args.parallel)
    data = summarise(comparison, runs)
    data["verdicts"] = verdicts(data)
    data["failed"] = failed
    write(data, args.out / f"{comparison.name}.json", render)


if __name__ == "__main__":
    main()
