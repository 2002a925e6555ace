"""A low-memory frozen base (`model.base_dtype`) on minilm with LoRA: weight bytes and
one-step time for fp32 / bf16 / int8.

One process, one thread (torch.set_num_threads(1)), minilm classifier with LoRA r=8 on
query/value (the default) and a 2-way head, AdamW; a batch of 16 x 128 real tokens.
Every configuration is built once; then, for several rounds, each one takes `--steps`
steps in turn (forward, backward, optimiser) so load on a shared machine hits all alike.
Step time per configuration = median over all its timed steps; its ratio to fp32 =
median of the per-round ratios of the round medians. Also: how far the stored base moves
the pooled sentence features of the batch from the fp32 model's (min cosine, relative
error), before any training.

    nice .venv/bin/python benchmarks/base_dtype.py [--rounds 5 --steps 3]

Writes benchmarks/results/base_dtype.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cotune.config.schema import LoraConfig, ModelConfig  # noqa: E402
from cotune.models import build_classifier  # noqa: E402
from cotune.models.base_dtype import FrozenLinear, weight_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = ("fp32", "bf16", "int8")
MiB = 1 << 20


def base_linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen base's Linear weights (+ int8 scales), biases excluded."""
    total = 0
    for m in model.modules():
        if isinstance(m, FrozenLinear):
            total += m.stored_weight.nbytes
            total += 0 if m.weight_scale is None else m.weight_scale.nbytes
        elif type(m) is torch.nn.Linear and not m.weight.requires_grad:
            total += m.weight.nbytes
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(1000, 29000, (args.batch, args.tokens))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (args.batch,)),
    }
    arms: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for dt in DTYPES:
        cfg = ModelConfig(name="minilm", lora=LoraConfig(), base_dtype=dt)
        model, _, _ = build_classifier(cfg, 2, seed=0)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        arms[dt] = (model, opt)
        rows[dt] = {
            "weight_bytes": weight_bytes(model),
            "base_linear_bytes": base_linear_bytes(model),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "times": [],
        }

    # how far the stored base moves the model: the pooled sentence features of the batch
    # (eval mode, LoRA B = 0 so the adapters add nothing) against the fp32 model's
    with torch.no_grad():
        pooled = {}
        for dt in DTYPES:
            model = arms[dt][0]
            model.eval()
            clf = model.get_base_model()
            pooled[dt] = clf.pool(clf.encode(ids, batch["attention_mask"]), batch["attention_mask"])
            model.train()
    for dt in DTYPES:
        cos = torch.nn.functional.cosine_similarity(pooled[dt], pooled["fp32"], dim=-1)
        rows[dt]["pooled_cosine_to_fp32_min"] = float(cos.min())
        rows[dt]["pooled_rel_error_to_fp32"] = float(
            (pooled[dt] - pooled["fp32"]).norm() / pooled["fp32"].norm()
        )

    def step(dt: str) -> float:
        model, opt = arms[dt]
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for dt in DTYPES:  # warm-up (optimiser state, allocator)
        step(dt)
    ratios: dict[str, list[float]] = {dt: [] for dt in DTYPES}
    for _ in range(args.rounds):
        medians = {}
        for dt in DTYPES:
            ts = [step(dt) for _ in range(args.steps)]
            rows[dt]["times"].extend(ts)
            medians[dt] = statistics.median(ts)
        for dt in DTYPES:
            ratios[dt].append(medians[dt] / medians["fp32"])
    for dt in DTYPES:
        rows[dt]["step_s_median"] = statistics.median(rows[dt]["times"])
        rows[dt]["step_ratio_to_fp32"] = statistics.median(ratios[dt])
    result = {
        "model": "minilm",
        "lora": LoraConfig().model_dump(),
        "batch": args.batch,
        "tokens": args.tokens,
        "threads": 1,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "note": "shared 2-core machine, other jobs running: times are indicative",
        "arms": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "base_dtype.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        "| base_dtype | weights (MiB) | base Linear weights (MiB) | step (s) | vs fp32 "
        "| pooled features: min cosine / rel. error vs fp32 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for dt in DTYPES:
        r = rows[dt]
        print(
            f"| {dt} | {r['weight_bytes'] / MiB:.1f} | {r['base_linear_bytes'] / MiB:.1f} | "
            f"{r['step_s_median']:.3f} | {r['step_ratio_to_fp32']:.2f}x | "
            f"{r['pooled_cosine_to_fp32_min']:.5f} / {r['pooled_rel_error_to_fp32']:.4f} |"
        )


if __name__ == "__main__":
    main()
