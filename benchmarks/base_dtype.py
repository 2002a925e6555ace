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

With --rss: resident memory instead, one fresh process per configuration and per
allocator setting (glibc's default, and MALLOC_MMAP_THRESHOLD_=65536 so that freed large
blocks leave RSS): RSS once the model is built, and the peak RSS of each of --rss-steps
training steps (the max over steps 2..N is reported; step 1 allocates Adam's state).

    nice .venv/bin/python benchmarks/base_dtype.py [--rounds 5 --steps 3]
    nice .venv/bin/python benchmarks/base_dtype.py --rss [--rss-steps 4]

Writes benchmarks/results/base_dtype.json (the --rss results under "rss", kept across
runs of the other phase and vice versa) and prints markdown tables.
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


def make_batch(size: int, tokens: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(1000, 29000, (size, tokens))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (size,)),
    }


def rss_worker(dt: str, steps: int, size: int, tokens: int) -> dict[str, Any]:
    """One configuration in this (fresh) process: RSS after the build, peak per step."""
    from cotune.memory.measure import PeakRSS, current_rss_bytes

    torch.set_num_threads(1)
    batch = make_batch(size, tokens)
    before = current_rss_bytes()
    model, _, _ = build_classifier(ModelConfig(name="minilm", lora=LoraConfig(), base_dtype=dt), 2)
    built = current_rss_bytes()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    peaks = []
    for _ in range(steps):
        with PeakRSS() as peak:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peaks.append(peak.peak_bytes)
    return {
        "rss_before_build_bytes": before,
        "rss_after_build_bytes": built,
        "peak_rss_bytes_per_step": peaks,
        "peak_rss_bytes": max(peaks[1:]),
        "weight_bytes": weight_bytes(model),
    }


def phase_rss(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, env in (
        ("glibc_default", {}),
        ("mmap_threshold_64k", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
    ):
        out[label] = {}
        for dt in DTYPES:
            cmd = [sys.executable, __file__, "--rss-worker", dt, "--rss-steps", str(args.rss_steps),
                   "--batch", str(args.batch), "--tokens", str(args.tokens)]  # fmt: skip
            proc = subprocess.run(
                cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True
            )
            out[label][dt] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| base_dtype | allocator | RSS after build (MiB) | peak RSS of a step (MiB) |")
    print("| --- | --- | ---: | ---: |")
    for label, rows in out.items():
        for dt, r in rows.items():
            print(
                f"| {dt} | {label} | {r['rss_after_build_bytes'] / MiB:.0f} | "
                f"{r['peak_rss_bytes'] / MiB:.0f} |"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rss", action="store_true", help="measure resident memory instead")
    ap.add_argument("--rss-steps", type=int, default=4)
    ap.add_argument("--rss-worker", choices=DTYPES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker, args.rss_steps, args.batch, args.tokens)))
        return
    path = RESULTS / "base_dtype.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    if args.rss:
        RESULTS.mkdir(parents=True, exist_ok=True)
        previous["rss"] = {"steps": args.rss_steps, "threads": 1, **phase_rss(args)}
        path.write_text(json.dumps(previous, indent=2) + "\n")
        return
    torch.set_num_threads(1)
    batch = make_batch(args.batch, args.tokens)
    ids = batch["input_ids"]
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
    if "rss" in previous:
        result["rss"] = previous["rss"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
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
