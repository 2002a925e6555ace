"""The LM head only where the completion-only loss reads it: step time and peak memory of
LoRA fine-tuning a causal LM on E2E with the logits of completion positions only
(`CompletionLM`, through transformers' `logits_to_keep` mask) against the logits of
every position (what cotune computed before; `CompletionLM.masks_logits = False`).

The loss and the gradients are the same (tests/test_completion_logits.py); what changes
is the LM head's work: with Gemma 3's 262,144-token vocabulary its matmul and its float32
logits are most of a step, and on E2E about a third of the positions of a batch
(prompts and padding are the rest) predict a completion token.

- time: one process per model; the two ways alternate step by step for --rounds rounds
  (so load on the shared machine hits both alike); step time = median over rounds, the
  ratio = median of the per-round ratios. One torch thread.
- memory: one fresh process per (model, way), --steps steps; peak RSS of the process
  over the steps (its high-water mark reset after loading the model and data).

The budget is examples/e2e-gemma3-centralized.toml's (LoRA r8 on q/v, batches of 8 pairs
of at most 96 tokens); SmolLM2-135M (vocabulary 49,152) runs the same batches.

    nice .venv/bin/python benchmarks/completion_logits.py

Writes benchmarks/results/completion_logits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "completion_logits.json"
CONFIG = ROOT / "examples" / "e2e-gemma3-centralized.toml"
MODELS = ("gemma3-270m", "smollm2-135m")
WAYS = ("full", "masked")


def setup(model_name: str) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(model, optimizer, batches): the example's LoRA model and its first E2E batches."""
    import torch

    from cotune.config import load_config
    from cotune.data import load_task
    from cotune.models.causal_lm import build_lm
    from cotune.training import adapter_for

    torch.set_num_threads(1)
    os.chdir(CONFIG.parent)  # the example's data path is relative to it
    cfg = load_config(str(CONFIG))
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": model_name})})
    task = load_task(cfg.task, cfg.seed)
    model, tokenizer, _ = build_lm(
        cfg.model, seed=cfg.seed, label_smoothing=cfg.train.label_smoothing
    )
    model.train()
    adapter = adapter_for(task, cfg)
    loader = adapter.loader(adapter.encode(task.train[:400], tokenizer), tokenizer,
                            shuffle=True, seed=0)  # fmt: skip
    batches = [b for _, b in zip(range(16), loader, strict=False)]
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), batches


def step(model: Any, opt: Any, batch: dict[str, Any], way: str) -> float:
    model.masks_logits = way == "masked"
    t0 = time.perf_counter()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
          labels=batch["labels"]).loss.backward()  # fmt: skip
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def child_memory(model_name: str, way: str, steps: int) -> None:
    model, opt, batches = setup(model_name)
    at_rest = vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) from here on: not loading's
    kept = []
    for i in range(steps):
        step(model, opt, batches[i], way)
        kept.append(int((batches[i]["labels"][:, 1:] != -100).sum()))
    peak = vm_kib("VmHWM") * 1024
    shape = list(batches[0]["input_ids"].shape)
    print(json.dumps({"peak_rss_mib": peak / 2**20, "at_rest_mib": at_rest / 1024,
                      "first_batch": shape, "completion_tokens": kept}))  # fmt: skip


def vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS now, VmHWM its peak since the reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def timing(model_name: str, rounds: int) -> dict[str, Any]:
    model, opt, batches = setup(model_name)
    step(model, opt, batches[0], "masked")  # warm-up: the optimiser state
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    for r in range(rounds):
        batch = batches[1 + r % (len(batches) - 1)]
        for way in WAYS if r % 2 == 0 else WAYS[::-1]:
            times[way].append(step(model, opt, batch, way))
        print(f"  {model_name} round {r + 1}/{rounds}: "
              + ", ".join(f"{w} {times[w][-1]:.2f} s" for w in WAYS), flush=True)  # fmt: skip
    ratios = [m / f for m, f in zip(times["masked"], times["full"], strict=True)]
    return {"step_s_median": {w: statistics.median(t) for w, t in times.items()},
            "masked_over_full": statistics.median(ratios), "rounds": rounds}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--phase", choices=("memory", "time"), help="only this phase (default: both)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "WAY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child_memory(args.child[0], args.child[1], args.steps)
        return
    # a phase run alone keeps the other phase's figures in the JSON
    results: dict[str, Any] = json.loads(OUT.read_text()) if OUT.is_file() else {"models": {}}
    for name in args.models.split(","):
        entry: dict[str, Any] = results["models"].setdefault(name, {})
        if args.phase in (None, "memory"):
            results["memory_steps"] = args.steps
            entry["memory"] = {}
            for way in WAYS:
                done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                                       "--child", name, way],
                                      capture_output=True, text=True, check=True)  # fmt: skip
                entry["memory"][way] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{name} {way}: peak RSS {entry['memory'][way]['peak_rss_mib']:,.0f} MiB",
                      flush=True)  # fmt: skip
        if args.phase in (None, "time"):
            entry["time"] = timing(name, args.rounds)
            print(f"{name}: masked / full step time {entry['time']['masked_over_full']:.2f}",
                  flush=True)  # fmt: skip
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
