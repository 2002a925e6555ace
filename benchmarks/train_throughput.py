"""Throughput of cotune's centralized loop against a minimal hand-written PyTorch loop.

Same model (minilm, full fine-tuning), same data (bbc-news; articles are long, so every
batch is exactly batch x seq tokens), same batches in the same order, fp32 and bf16,
in one process. Reports tokens/s of both, cotune's overhead, and the achieved FLOP/s
(counted with torch's FlopCounterMode on one training step) as a fraction of a dense
matmul of the same dtype measured in the same run.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--rounds 3]

Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cotune.config import build_config  # noqa: E402
from cotune.data import encode, load_task, make_loader  # noqa: E402
from cotune.methods import resolve  # noqa: E402
from cotune.models import build_classifier  # noqa: E402
from cotune.training import (  # noqa: E402
    ModelStep,
    autocast,
    fit,
    make_optimizer,
    make_schedule,
    seed_everything,
)

RESULTS = Path(__file__).parent / "results"


def matmul_flops_per_s(dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    dt = time.perf_counter() - t0
    return 2 * n**3 * reps / dt


def hand_loop(model, batches, optimizer, precision: str) -> None:  # type: ignore[no-untyped-def]
    """The minimal loop: forward, backward, step, zero_grad."""
    model.train()
    for batch in batches:
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"),
                    labels=batch["labels"],
                )
        else:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch.get("token_type_ids"),
                labels=batch["labels"],
            )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def step_flops(model, batch, precision: str) -> int:  # type: ignore[no-untyped-def]
    counter = FlopCounterMode(display=False)
    with counter, autocast(precision):
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per loop")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = ap.parse_args()

    cfg = resolve(
        build_config(
            {
                "task": {"name": "bbc-news"},
                "model": {"name": "minilm"},
                "train": {"batch_size": args.batch, "max_seq_len": args.seq, "lr": 5e-5},
            }
        )
    )
    seed_everything(0)
    task = load_task(cfg.task, 0)
    model, tok, _ = build_classifier(cfg.model, task.num_labels, seed=0)
    loader = make_loader(
        encode(task.train, tok, args.seq), args.batch, shuffle=True, seed=0,
        pad_token_id=tok.pad_token_id, drop_last=True,
    )  # fmt: skip
    n_batches = args.steps
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == n_batches:
            break
    tokens_per_block = sum(int(b["attention_mask"].numel()) for b in batches)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    results: dict[str, object] = {
        "model": "minilm (full fine-tuning)",
        "task": "bbc-news",
        "batch": args.batch,
        "seq": args.seq,
        "steps_per_block": args.steps,
        "blocks": args.rounds,
        "padded_tokens_per_block": tokens_per_block,
        "real_token_fraction": real_tokens / tokens_per_block,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "precisions": {},
    }
    for precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        optimizer = make_optimizer(model.parameters(), cfg)
        schedule = make_schedule(optimizer, 10_000, cfg.train)
        # cotune's step function: train_step with saved-tensor measurement, as in a run
        step = ModelStep(model, optimizer, schedule, precision=precision,
                         max_grad_norm=cfg.train.max_grad_norm)  # fmt: skip
        warm = batches[:2]  # warm-up both paths (fewer batches when --steps is 1)
        hand_loop(model, warm, optimizer, precision)
        fit(step, iter(warm), len(warm))
        hand_times, cotune_times = [], []
        for _ in range(args.rounds):  # alternate blocks so drift hits both loops alike
            t0 = time.perf_counter()
            hand_loop(model, batches, optimizer, precision)
            hand_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fit(step, iter(batches), len(batches))
            cotune_times.append(time.perf_counter() - t0)
        flops = step_flops(model, batches[0], precision)
        peak = matmul_flops_per_s(dtype)
        hand_s = statistics.median(hand_times)
        cot_s = statistics.median(cotune_times)
        hand_tps = tokens_per_block / hand_s
        cot_tps = tokens_per_block / cot_s
        res = {
            "hand_tokens_per_s": hand_tps,
            "cotune_tokens_per_s": cot_tps,
            "cotune_overhead": 1 - cot_tps / hand_tps,
            "hand_block_s": hand_times,
            "cotune_block_s": cotune_times,
            "train_flops_per_step": flops,
            "cotune_achieved_flops_per_s": flops * len(batches) / cot_s,
            "matmul_flops_per_s": peak,
            "cotune_fraction_of_matmul": flops * len(batches) / cot_s / peak,
            "hand_fraction_of_matmul": flops * len(batches) / hand_s / peak,
        }
        results["precisions"][precision] = res  # type: ignore[index]
        print(
            f"{precision}: hand {hand_tps:,.0f} tok/s, cotune {cot_tps:,.0f} tok/s "
            f"(overhead {100 * res['cotune_overhead']:+.1f}%), "
            f"{res['cotune_achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
            f"{100 * res['cotune_fraction_of_matmul']:.0f}% of a {precision} matmul "
            f"({peak / 1e9:.1f} GFLOP/s)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
