"""What differential privacy costs in accuracy: SST-2 accuracy against epsilon, 3 seeds.

Two comparisons, each an arm without noise and arms at epsilon 8, 3 and 1 (delta 1e-5,
Opacus's RDP accountant), on one budget for every arm, scored on the full 872-sentence
SST-2 dev set (the same examples for every seed):

- `split-sft`: split with the SFT cut (minilm, cut 3, r8, labels on the cloud; full
  fine-tuning on both sides), 150 steps of 16 phrases (max 32 tokens) from an 8,000-phrase
  subsample. DP on the cut (`[privacy]`): every token row of the cut clipped to L2 norm 1
  and Gaussian noise added on the device before the codec; epsilon per training example.
  Evaluation also sends noised rows; its epsilon (`eval_epsilon`) is reported apart.
- `fedlora`: fedlora (minilm, LoRA r8) over 20 devices (iid shares of a 4,000-phrase
  subsample), 10 sampled per round, 4 rounds of 5 local steps of 16. User-level DP in
  rounds (`privacy.federated = "server"`: Flower's server-side fixed clipping of each
  device's update to L2 norm 0.5, Gaussian noise on the sum); epsilon per device.

Configs: benchmarks/configs/sst2-split-sft-dp.toml and sst2-fedlora-dp.toml.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dp_accuracy.py --which split-sft
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dp_accuracy.py --which fedlora
    .venv/bin/python benchmarks/dp_accuracy.py --which split-sft --summary-only

Resumable (finished runs are not run again). Writes benchmarks/results/dp_accuracy/
<comparison>.json (+ .md); the runs stay under benchmarks/results/dp_accuracy/
<comparison>/<arm>/seed-S with their per-example predictions.
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

from cotune.report import read_summary
from cotune.report.aggregate import seed_dir

OUT = ROOT / "benchmarks" / "results" / "dp_accuracy"
CONFIGS = ROOT / "benchmarks" / "configs"
EPSILONS = (8, 3, 1)


def split_sft() -> Comparison:
    config = CONFIGS / "sst2-split-sft-dp.toml"
    arms = [Arm("none", config)] + [
        Arm(f"eps{e}", config, (f"privacy.epsilon={e}",)) for e in EPSILONS
    ]
    return Comparison("split-sft", arms, [Pair(f"eps{e}", "none", "accuracy") for e in EPSILONS])


def fedlora() -> Comparison:
    config = CONFIGS / "sst2-fedlora-dp.toml"
    dp = ('privacy.federated="server"', "privacy.clip=0.5")
    arms = [Arm("none", config)] + [
        Arm(f"eps{e}", config, (*dp, f"privacy.epsilon={e}")) for e in EPSILONS
    ]
    return Comparison("fedlora", arms, [Pair(f"eps{e}", "none", "accuracy") for e in EPSILONS])


COMPARISONS = {"split-sft": split_sft, "fedlora": fedlora}


def epsilon_spent(arm_dir: Path, seeds: list[int]) -> float | None:
    """The mean epsilon the arm's runs spent on training: the final metric `epsilon`
    (split; federated runs since it was added), else summary.json's `privacy.epsilon`
    (federated runs written before)."""
    vals = []
    for s in seeds:
        summary = read_summary(seed_dir(arm_dir, s))
        eps = summary["metrics"].get("epsilon", summary.get("privacy", {}).get("epsilon"))
        if eps is not None:
            vals.append(float(eps))
    return sum(vals) / len(vals) if vals else None


def render(data: dict[str, Any]) -> str:
    lines = [
        f"## dp_accuracy: {data['comparison']} (SST-2 dev, 872 sentences)",
        "",
        "| arm | seeds | accuracy (mean ± 95% t-interval) | epsilon spent (training) |",
        "|---|---|---|---|",
    ]
    for name, arm in data["arms"].items():
        eps = arm.get("epsilon_spent_mean")
        spent = "inf (no noise)" if name == "none" else f"{eps:.2f}" if eps else "-"
        lines.append(f"| {name} | {len(arm['seeds'])} | {describe(arm, 'accuracy')} | {spent} |")
    lines += ["", *differences_table(data["differences"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--which", choices=sorted(COMPARISONS), required=True)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--summary-only", action="store_true", help="only summarise finished runs")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    os.chdir(ROOT)
    comparison = COMPARISONS[args.which]()
    runs = args.out / comparison.name
    failed = [] if args.summary_only else run(comparison, runs, args.parallel)
    data = summarise(comparison, runs)
    for name, arm in data["arms"].items():
        arm["epsilon_spent_mean"] = epsilon_spent(runs / name, arm.get("seeds", []))
    data["failed"] = failed
    write(data, args.out / f"{comparison.name}.json", render)


if __name__ == "__main__":
    main()
