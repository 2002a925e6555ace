"""The seeds' own tasks, measured: SQuAD v1.1 extractive QA (SFT's seed), Fashion-MNIST
with a pretrained ViT (FedPFT's CV setting, BackRazor's models), and E2E with a second
decoder, Gemma-3-270M.

Three groups, each a comparison of arms run as `cotune run` children (resumable: a
finished run is kept, an interrupted federated run continues from its last round):

- `squad`: all-MiniLM-L6-v2 with LoRA r8 and a span head (`examples/squad-centralized.toml`:
  600 steps of 16 windows of 256 tokens, doc stride 128; trained on the 38 articles of
  the offline dev file's by-article split, scored on all 2,577 questions of the other 10).
  Arms: `centralized`; `split-sft` (cut 3, `sft` r8 with an int8 code: 8 bytes per
  token each way); `split-identity` (cut 3, the full-width fp32 cut, one seed: the bytes
  `sft` is measured against). Target: centralized F1 >= 50.
- `fashion`: dinov2-small (DINOv2 ViT-S/14) with LoRA r8 on query/value and a linear
  head on CLS (`examples/fashion-mnist-lora.toml`: images upscaled to 56 x 56, 1,200
  steps of 16 on a 20,000-image subsample, scored on all 10,000 test images). Arms: `centralized`;
  `centralized-112px` (the same at 112 x 112, 64 patches against 16: about 4x the
  compute; the 0.90 target is checked on it, the other arms compare at 56 px);
  `split-sft` and `split-int8` (cut 3); `backrazor-0.3` (centralized,
  `memory.backward = "backrazor"`, keep 0.3: saved-activation bytes against
  `centralized`'s); federated with 10 devices, all taking part in each of 10 rounds of
  10 local steps of 16: `fedlora-iid`, `fedlora-dir0.5` (Dirichlet 0.5 over classes),
  and FedPFT's CV comparison on the iid split: `fedpft-iid` (the neuron proxy aligned on
  the public `digits` images) and `layer_drop-iid`, scored on the full model like
  `fedlora-iid`.
- `gemma`: Gemma-3-270M with LoRA r8 on q/v (`examples/e2e-gemma3-centralized.toml`: 300
  steps of 8 pairs of at most 96 tokens) against `untuned` (`train.steps = 0`: the base
  model prompted the same way); both scored on 100 test MRs with all their references
  (beam 4), five metrics.

Intervals: with one seed, the paired bootstrap over the evaluation examples (questions,
images, MRs: the same ones for every arm); with more (`--seeds 0,1,2`), the Student t
over seeds too, and a difference is decided on the wider.

    nice .venv/bin/python benchmarks/seed_tasks.py --group fashion --parallel 2
    .venv/bin/python benchmarks/seed_tasks.py --summary-only          # JSON + tables

Writes benchmarks/results/seed_tasks/<group>.json (+ .md); runs under
benchmarks/results/seed_tasks/<group>/<arm>/seed-S.
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
    differences_table,
    run,
    seed_dir,
    summarise,
    write,
)

from cotune.report.run_folder import read_jsonl

OUT = ROOT / "benchmarks" / "results" / "seed_tasks"
EXAMPLES = ROOT / "examples"
GROUPS = ("squad", "fashion", "gemma")
PRIMARY = {"squad": ("f1", "exact_match"), "fashion": ("accuracy",),
           "gemma": ("bleu", "nist", "meteor", "rouge_l", "cider")}  # fmt: skip

SPLIT = ('method="split"', "split.cut=3")
SFT8 = (*SPLIT, 'link.codec="sft"', "link.rank=8", 'link.code_format="int8"')
FEDERATED = ("federated.clients=10", "federated.fraction=1.0", "federated.rounds=10",
             "federated.local_steps=10", "federated.eval_every=10",
             'runtime.engine="inline"')  # fmt: skip


def comparison(group: str, seeds: list[int]) -> Comparison:
    if group == "squad":
        config = EXAMPLES / "squad-centralized.toml"
        arms = [
            Arm("centralized", config),
            Arm("split-sft", config, SFT8),
            Arm("split-identity", config, (*SPLIT, 'link.codec="identity"'), seeds=(0,)),
        ]
        pairs = [Pair("split-sft", "centralized", "f1"),
                 Pair("split-sft", "centralized", "exact_match")]  # fmt: skip
    elif group == "fashion":
        config = EXAMPLES / "fashion-mnist-lora.toml"
        arms = [
            Arm("centralized", config),
            Arm("centralized-112px", config, ("task.image_size=112",)),
            Arm("split-sft", config, SFT8),
            Arm("split-int8", config, (*SPLIT, 'link.codec="int8"')),
            Arm("backrazor-0.3", config, ('memory.backward="backrazor"', "memory.keep=0.3")),
            Arm("fedlora-iid", config, ('method="fedlora"', *FEDERATED)),
            Arm(
                "fedlora-dir0.5",
                config,
                (
                    'method="fedlora"',
                    *FEDERATED,
                    'federated.partition="dirichlet"',
                    "federated.alpha=0.5",
                ),
            ),  # fmt: skip
            Arm("fedpft-iid", config, ('method="fedpft"', *FEDERATED, 'proxy.kind="neuron"')),
            Arm(
                "layer_drop-iid", config, ('method="fedpft"', *FEDERATED, 'proxy.kind="layer_drop"')
            ),  # fmt: skip
        ]
        pairs = [Pair(a, "centralized", "accuracy")
                 for a in ("split-sft", "split-int8", "backrazor-0.3", "fedlora-iid")]  # fmt: skip
        pairs += [Pair("centralized-112px", "centralized", "accuracy"),
                  Pair("fedlora-dir0.5", "fedlora-iid", "accuracy"),
                  Pair("fedpft-iid", "layer_drop-iid", "accuracy"),
                  Pair("fedpft-iid", "fedlora-iid", "accuracy")]  # fmt: skip
    elif group == "gemma":
        config = EXAMPLES / "e2e-gemma3-centralized.toml"
        arms = [Arm("untuned", config, ("train.steps=0",)), Arm("centralized", config)]
        pairs = [Pair("centralized", "untuned", m) for m in PRIMARY["gemma"]]
    else:
        raise ValueError(f"unknown group {group!r}; valid: {', '.join(GROUPS)}")
    return Comparison(group, arms, pairs, seeds=seeds)


def scale(metric: str) -> float:
    """Shown x100: accuracy (0-1). As they are: F1 / EM / BLEU / ROUGE-L (percentages)
    and NIST / METEOR / CIDEr (their own scales)."""
    return 100.0 if metric == "accuracy" else 1.0


def fmt(arm: dict[str, Any], metric: str) -> str:
    m = arm.get("metrics", {}).get(metric)
    if not m:
        return "-"
    k, hw = scale(metric), m.get("half_width")
    digits = 2 if metric != "meteor" else 4
    text = f"{k * m['mean']:.{digits}f}"
    return text + (f" ± {k * hw:.{digits}f}" if hw is not None and hw == hw else "")


def mib(x: float | None) -> str:
    return "-" if not x else f"{x / 2**20:,.0f}"


def device_peak(arm: dict[str, Any]) -> str:
    """The device peak, or in brackets the process's of an inline federated run (every
    client in the server's process: not a device's)."""
    inline = arm.get("inline_process_peak_bytes_mean")
    return f"({mib(inline)})" if inline else mib(arm.get("device_peak_bytes_mean"))


def render(data: dict[str, Any]) -> str:
    group = data["comparison"]
    metrics = PRIMARY[group]
    head = " | ".join(metrics)
    lines = [f"## {group}", "",
             f"| arm | seeds | eval examples | {head} | MB up + down | device peak MiB | saved activations MiB | wall s |",
             "|---|---|---|" + "---|" * len(metrics) + "---|---|---|---|"]  # fmt: skip
    for name, arm in data["arms"].items():
        if not arm.get("seeds"):
            lines.append(f"| {name} | not run yet |" + " |" * (len(metrics) + 5))
            continue
        b = arm.get("bytes_mean")
        lines.append(
            f"| {name} | {len(arm['seeds'])} | {arm.get('eval_size')} | "
            + " | ".join(fmt(arm, m) for m in metrics)
            + f" | {f'{b / 1e6:,.1f}' if b else '0'} | {device_peak(arm)}"
            f" | {mib(arm.get('saved_activation_bytes_mean'))} | "
            f"{arm.get('wall_s_mean') or 0:,.0f} |"
        )
    if any(arm.get("inline_process_peak_bytes_mean") for arm in data["arms"].values()):
        lines += ["", "A device peak in brackets is the process's of a federated run on the inline "
                  "engine, where every client trains in the server's process: not a device's."]  # fmt: skip
    lines += ["", "Differences (accuracy in points x100, the other metrics on their own scales):",
              "", *differences_table(data["differences"], scale=scale)]  # fmt: skip
    if data.get("curves"):
        lines += ["", f"Learning curves ({metrics[0]} at each evaluation, by step or round):", ""]
        for run_name, points in data["curves"].items():
            text = ", ".join(f"{at} {scale(metrics[0]) * v:.2f}" for at, v in points)
            lines.append(f"- {run_name}: {text}")
    return "\n".join(lines) + "\n"


def curves(group: str, runs: Path, comp: Comparison) -> dict[str, list[tuple[str, float]]]:
    """Every finished or running seed's evaluations of the group's first metric, from its
    metrics.jsonl: ("step 300", 0.41) or ("round 10", 0.88) in order."""
    metric, out = PRIMARY[group][0], {}
    for arm in comp.arms:
        for seed in arm.seeds if arm.seeds is not None else comp.seeds:
            path = seed_dir(runs / arm.name, seed) / "metrics.jsonl"
            if not path.is_file():
                continue
            records = read_jsonl(path)
            points = [(f"step {r['step']}" if "step" in r else f"round {r['round']}", r[metric])
                      for r in records if metric in r]  # fmt: skip
            if points:
                out[f"{arm.name} seed {seed}"] = points
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--group", choices=GROUPS, action="append",
                   help="the groups to run (repeatable; default: all, in order)")  # fmt: skip
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--only", default="", help="run only these arms (comma-separated)")
    p.add_argument("--summary-only", action="store_true", help="only summarise finished runs")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    os.chdir(ROOT)  # the example configs' data paths are relative to their folder
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    only = {a for a in args.only.split(",") if a}
    for group in args.group or GROUPS:
        comp = comparison(group, seeds)
        runs = args.out / group
        todo = Comparison(comp.name, [a for a in comp.arms if not only or a.name in only],
                          comp.pairs, comp.seeds)  # fmt: skip
        failed = [] if args.summary_only else run(todo, runs, args.parallel)
        data = summarise(comp, runs)
        data["failed"] = failed
        data["curves"] = curves(group, runs, comp)
        write(data, args.out / f"{group}.json", render)


if __name__ == "__main__":
    main()
