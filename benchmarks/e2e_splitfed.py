"""E2E NLG: centralized LoRA vs splitfed (3 devices, cut 3) vs fedlora (3 clients), and
the untuned model, on one budget (SplitLoRA's E2E comparison).

Budget (the same for every method): `--steps` optimiser steps over a batch of `--batch`
examples. centralized takes `steps` steps of `batch`; splitfed's 3 devices each take
`steps` steps of `batch / 3` concurrently (one round = `batch` examples, averaged every
`--every` steps); fedlora runs `steps / local` rounds of `local` steps of `batch / 3`
on each of 3 clients. Same model, LoRA rank/alpha/targets, LR and schedule, label
smoothing, sequence cap. Every method is scored on the same test MRs by beam search
on the (merged) model with the five E2E metrics.

    nice .venv/bin/python benchmarks/e2e_splitfed.py            # defaults: the run in docs/splitfed.md
    nice .venv/bin/python benchmarks/e2e_splitfed.py --model tiny-llama --train 60 --steps 4 --test-mrs 4

Writes benchmarks/results/e2e_splitfed.json (after every method, so a partial run keeps
what finished) and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")


def base_config(args: argparse.Namespace, method: str) -> Any:
    from cotune.config import build_config
    from cotune.methods import resolve

    per_device = args.batch // 3
    raw: dict[str, Any] = {
        "name": f"e2e-{method}",
        "method": method,
        "seed": args.seed,
        "task": {
            "name": "e2e",
            "data_dir": args.data_dir,
            "max_train_examples": args.train,
            "max_eval_examples": args.test_mrs,
        },
        "model": {
            "name": args.model,
            "lora": {"r": args.rank, "alpha": args.alpha, "dropout": 0.1},
        },
        "train": {
            "steps": args.steps,
            "batch_size": args.batch if method == "centralized" else per_device,
            "lr": args.lr,
            "warmup_ratio": 0.1,
            "max_seq_len": args.seq,
            "label_smoothing": 0.1,
            "threads": args.threads,
            "max_grad_norm": 1.0,
        },
        "generation": {
            "num_beams": args.beam,
            "length_penalty": 0.8,
            "no_repeat_ngram_size": 4,
            "max_new_tokens": args.max_new,
            "batch_size": 4,
        },
        "split": {"cut": 3, "server": args.server},
        "federated": {"clients": 3, "aggregate_every": args.every, "partition": "iid"},
    }
    if method == "fedlora":
        raw["federated"].update(rounds=args.steps // args.local, local_steps=args.local)
        raw["train"].pop("steps")
    return resolve(build_config(raw))


def device_param_bytes(cfg: Any, method: str) -> int:
    """Bytes of the weights a device holds: the device segment for splitfed, the whole
    model otherwise."""
    from cotune.models.causal_lm import build_lm

    if method == "splitfed":
        from cotune.methods.splitfed import build_lm_split

        split, _, _, _ = build_lm_split(cfg)
        return sum(p.numel() * p.element_size() for p in split.device.parameters())
    model, _, _ = build_lm(cfg.model, seed=cfg.seed, label_smoothing=cfg.train.label_smoothing)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_splitfed(cfg: Any, run: Any) -> Any:
    """splitfed through the split launcher, keeping hold of the cloud service (in
    process) to report its last averaging round."""
    import dataclasses

    from cotune.methods import get_spec
    from cotune.runtime.split.launch import run_split

    spec = get_spec("splitfed").runs
    clouds: list[Any] = []

    def cloud(c: Any) -> Any:
        clouds.append(spec.cloud(c))
        return clouds[-1]

    result = run_split(cfg, dataclasses.replace(spec, cloud=cloud), run, run.path)
    if clouds:
        result.extra["rounds"] = clouds[0].aggregator.rounds[-1:]
    for device in result.extra.get("devices", []):  # averaging rounds taken part in
        if isinstance(device.get("rounds"), list):
            device["rounds"] = len(device["rounds"])
    return result


def run_method(args: argparse.Namespace, method: str, out: Path) -> dict[str, Any]:
    from cotune.report import RunFolder

    cfg = base_config(args, "centralized" if method == "untuned" else method)
    run = RunFolder(out / method)
    run.start_fresh()
    t0 = time.perf_counter()
    if method == "untuned":
        from cotune.methods.federated.data import task_for
        from cotune.models.causal_lm import build_lm
        from cotune.training import set_threads
        from cotune.training.evaluation import evaluate_generation, write_generations

        set_threads(cfg.train)
        model, tokenizer, _ = build_lm(
            cfg.model, seed=cfg.seed, label_smoothing=cfg.train.label_smoothing
        )
        task = task_for(cfg)
        metrics, texts = evaluate_generation(model.lm, tokenizer, task, cfg.generation)
        write_generations(run.path, task, texts)
        return {"method": "untuned", "metrics": metrics, "wall_s": time.perf_counter() - t0}
    if method == "fedlora":
        from cotune.runtime.federated.engine import run_federated

        # the ServerApp writes metrics.jsonl into the run folder itself
        result = run_federated(cfg, run.path, engine="inline")
    else:  # centralized, splitfed: the method's spec, reporting into the run folder
        from safetensors.torch import save_file

        from cotune.runtime.experiment import run_method as run_spec

        result = run_splitfed(cfg, run) if method == "splitfed" else run_spec(cfg, run)
        for name, tensors in result.saved.items():  # the trained tensors, as a run keeps them
            if tensors:
                save_file({k: v.detach().contiguous() for k, v in tensors.items()},
                          str(run.path / name))  # fmt: skip
    wall = time.perf_counter() - t0
    return {
        "method": method,
        "metrics": result.metrics,
        "bytes_up": result.bytes_up,
        "bytes_down": result.bytes_down,
        "trainable_device": result.trainable_device,
        "trainable_cloud": result.trainable_cloud,
        "device_param_bytes": device_param_bytes(cfg, method),
        "peak_rss_bytes": result.device_peak_bytes,
        "wall_s": wall,
        "extra": {k: v for k, v in result.extra.items() if k in ("devices", "server", "rounds")},
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | BLEU | NIST | METEOR | ROUGE-L | CIDEr | bytes up | bytes down | "
        "device trainable | device weights | peak RSS | wall |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        m = r["metrics"]
        mb = lambda b: f"{b / 2**20:,.1f} MB" if b else "-"  # noqa: E731
        lines.append(
            f"| {r['method']} | {m['bleu']:.2f} | {m['nist']:.3f} | {m['meteor']:.4f} | "
            f"{m['rouge_l']:.2f} | {m['cider']:.3f} | {mb(r.get('bytes_up'))} | "
            f"{mb(r.get('bytes_down'))} | {r.get('trainable_device', '-'):,} | "
            f"{mb(r.get('device_param_bytes'))} | {mb(r.get('peak_rss_bytes'))} | "
            f"{r['wall_s']:,.0f} s |"
            if "bytes_up" in r
            else f"| {r['method']} | {m['bleu']:.2f} | {m['nist']:.3f} | {m['meteor']:.4f} | "
            f"{m['rouge_l']:.2f} | {m['cider']:.3f} | - | - | - | - | - | {r['wall_s']:,.0f} s |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "e2e"))
    p.add_argument("--train", type=int, default=240, help="training rows (MR, ref)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=6, help="examples per step (3 x per device)")
    p.add_argument("--every", type=int, default=4, help="splitfed: steps between averages")
    p.add_argument("--local", type=int, default=4, help="fedlora: local steps per round")
    p.add_argument("--server", default="shared", choices=["shared", "per_client"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--test-mrs", type=int, default=20)
    p.add_argument("--beam", type=int, default=2)
    p.add_argument("--max-new", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--methods", nargs="+", default=["untuned", "centralized", "splitfed", "fedlora"]
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "e2e_splitfed"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    rows: list[dict[str, Any]] = []
    if json_path.exists():  # keep what an earlier (partial) run of other methods finished
        rows = [
            r for r in json.loads(json_path.read_text())["rows"] if r["method"] not in args.methods
        ]
    for method in args.methods:
        print(f"== {method}", flush=True)
        rows.append(run_method(args, method, out))
        order = {m: i for i, m in enumerate(["untuned", "centralized", "splitfed", "fedlora"])}
        rows.sort(key=lambda r: order.get(r["method"], 9))
        json_path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(table(rows))
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
