"""Sparse saved activations for backward (`memory.backward`) on minilm: saved bytes, peak
memory, step time and SST-2 accuracy per mode, against `none`, measured in one run.

Phases (run all, or one with --phase; results accumulate in one JSON file):

- memory: one fresh process per configuration (`none`; random, norm, backrazor at each
  keep), full fine-tuning of minilm with AdamW, batch 16 x 128 tokens of bbc-news (long
  articles: every row is 128 real tokens), cotune's training loop `fit`: exact bytes
  saved for backward (autograd saved-tensor hooks) and peak resident memory per step,
  the max over steps 2..N (step 1 allocates the optimiser state). Peak RSS is measured
  twice: with glibc's default allocator settings (freed blocks up to 32 MB stay in the
  heap and in RSS) and with MALLOC_MMAP_THRESHOLD_=65536 (large blocks go back to the
  OS on free, so RSS follows the memory in use).
- time: one process and one model; every configuration is applied, stepped and removed
  in turn, for several rounds, so load on the shared machine hits all alike. Step time
  (forward, backward, optimiser) per configuration = median over rounds; its ratio to
  `none` = median of the per-round ratios.
- accuracy: `cotune run` (method centralized, full fine-tuning of minilm) on SST-2 from
  ../shared/data/glue/SST-2 for `none` and each mode at keep 0.1 and 0.3, all with the
  same seed and data order. Budget: --steps optimiser steps of batch 16 (max 64 tokens,
  dynamic padding), lr 5e-5, evaluation on the whole 872-sentence dev set.

    nice .venv/bin/python benchmarks/memory_backward.py [--phase memory|time|accuracy]

Writes benchmarks/results/memory_backward.json and prints markdown tables.
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"
MODES = ("random", "norm", "backrazor")
MiB = 1 << 20
MMAP_THRESHOLD = 1 << 16


def configs(keeps: list[float]) -> list[tuple[str, float]]:
    return [("none", 1.0)] + [(mode, keep) for keep in keeps for mode in MODES]


def label(mode: str, keep: float) -> str:
    return "none" if mode == "none" else f"{mode}@{keep:g}"


# ----------------------------------------------------------------------------- workers


def _bbc_batches(n: int, batch: int, seq: int) -> tuple[Any, Any, list[dict]]:
    import torch  # noqa: F401

    from cotune.config import build_config
    from cotune.data import encode, load_task, make_loader
    from cotune.methods import resolve
    from cotune.models import build_classifier
    from cotune.training import seed_everything

    cfg = resolve(
        build_config(
            {
                "task": {"name": "bbc-news"},
                "model": {"name": "minilm"},
                "train": {"batch_size": batch, "max_seq_len": seq, "lr": 5e-5},
            }
        )
    )
    seed_everything(0)
    task = load_task(cfg.task, 0)
    model, tok, _ = build_classifier(cfg.model, task.num_labels, seed=0)
    loader = make_loader(
        encode(task.train, tok, seq), batch, shuffle=True, seed=0,
        pad_token_id=tok.pad_token_id, drop_last=True,
    )  # fmt: skip
    batches = []
    for b in loader:
        assert b["input_ids"].shape == (batch, seq)
        batches.append(b)
        if len(batches) == n:
            break
    return cfg, model, batches


def worker_memory(mode: str, keep: float, steps: int, batch: int, seq: int) -> dict[str, Any]:
    import torch

    from cotune.config import MemoryConfig
    from cotune.memory import apply_memory_option
    from cotune.training import ModelStep, fit, make_optimizer

    torch.set_num_threads(1)
    cfg, model, batches = _bbc_batches(steps, batch, seq)
    apply_memory_option(model, MemoryConfig(backward=mode, keep=keep))
    optimizer = make_optimizer(model.parameters(), cfg)
    saved, peak, times = [], [], []
    for b in batches:
        # a fresh step per batch: its saved-bytes maximum covers this step only
        st = fit(ModelStep(model, optimizer, None, max_grad_norm=1.0), iter([b]), 1)
        saved.append(st.saved_activation_bytes)
        peak.append(st.peak_rss_bytes)
        times.append(st.train_s)
    return {
        "saved_bytes_per_step": saved,
        "peak_rss_bytes_per_step": peak,
        "step_s": times,
        "saved_activation_bytes": max(saved[1:]),
        "peak_rss_bytes": max(peak[1:]),
    }


def worker_time(
    keeps: list[float], rounds: int, batch: int, seq: int, threads: int = 1
) -> dict[str, Any]:
    import torch

    from cotune.config import MemoryConfig
    from cotune.memory import apply_memory_option, remove_memory_option
    from cotune.training import ModelStep, fit, make_optimizer

    torch.set_num_threads(threads)
    cfgs = configs(keeps)
    cfg, model, batches = _bbc_batches(2, batch, seq)
    optimizer = make_optimizer(model.parameters(), cfg)
    times: dict[str, list[float]] = {label(*c): [] for c in cfgs}
    for r in range(rounds + 1):  # round 0 warms every path up and is not counted
        for mode, keep in cfgs:
            if mode != "none":
                apply_memory_option(model, MemoryConfig(backward=mode, keep=keep))
            step = ModelStep(model, optimizer, None, max_grad_norm=1.0, measure=False)
            st = fit(step, iter(batches), len(batches), measure=False)
            remove_memory_option(model)
            if r > 0:
                times[label(mode, keep)].append(st.train_s / len(batches))
        print(f"  round {r}/{rounds}: none {times['none'][-1] if r else 0:.2f} s/step", flush=True)
    base = times["none"]
    return {
        name: {
            "step_s": statistics.median(ts),
            "ratio_to_none": statistics.median(t / b for t, b in zip(ts, base, strict=True)),
            "step_s_per_round": ts,
        }
        for name, ts in times.items()
    }


# ----------------------------------------------------------------------------- phases


def _run_worker(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker failed: {' '.join(args)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def phase_memory(a: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for mode, keep in configs(a.keeps):
        name = label(mode, keep)
        t0 = time.perf_counter()
        args = ["--worker", "memory", "--mode", mode, "--keep", str(keep),
                "--mem-steps", str(a.mem_steps)]  # fmt: skip
        res = _run_worker(args)
        # glibc keeps freed blocks of up to 32 MB in its heap (dynamic mmap threshold), so
        # RSS also counts memory the process no longer uses; with a fixed threshold large
        # blocks are unmapped on free and RSS follows live memory.
        mmap = _run_worker(args, {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
        res["peak_rss_bytes_mmap"] = mmap["peak_rss_bytes"]
        res["peak_rss_bytes_per_step_mmap"] = mmap["peak_rss_bytes_per_step"]
        assert mmap["saved_activation_bytes"] == res["saved_activation_bytes"]
        out[name] = res
        print(f"  {name:14s} saved {res['saved_activation_bytes'] / MiB:8.1f} MiB  "
              f"peak {res['peak_rss_bytes'] / MiB:6.0f} MiB (glibc default), "
              f"{res['peak_rss_bytes_mmap'] / MiB:6.0f} MiB (mmap threshold 64 KiB)  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    none = out["none"]
    for res in out.values():
        res["saved_ratio"] = none["saved_activation_bytes"] / res["saved_activation_bytes"]
        res["peak_saving_bytes"] = none["peak_rss_bytes"] - res["peak_rss_bytes"]
        res["peak_saving_bytes_mmap"] = none["peak_rss_bytes_mmap"] - res["peak_rss_bytes_mmap"]
    return out


def phase_time(a: argparse.Namespace) -> dict[str, Any]:
    args = ["--worker", "time", "--rounds", str(a.rounds), "--keeps", ",".join(map(str, a.keeps)),
            "--threads", str(a.threads)]  # fmt: skip
    return _run_worker(args)


def _sst2_config(path: Path, steps: int) -> None:
    path.write_text(
        "\n".join(
            [
                'name = "sst2-memory"',
                'method = "centralized"',
                "seed = 0",
                "[task]",
                'name = "glue/sst2"',
                f'data_dir = "{SST2}"',
                "[model]",
                'name = "minilm"',
                "[train]",
                f"steps = {steps}",
                "batch_size = 16",
                "max_seq_len = 64",
                "lr = 5e-5",
                f"eval_every = {max(1, steps // 2)}",
                "threads = 1",
                "",
            ]
        )
    )


def phase_accuracy(a: argparse.Namespace) -> dict[str, Any]:
    runs_dir = Path(a.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = runs_dir / "sst2-memory.toml"
    _sst2_config(base, a.steps)
    todo = configs(a.acc_keeps)
    procs: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    out: dict[str, Any] = {}

    def launch(mode: str, keep: float) -> None:
        name = label(mode, keep)
        run = runs_dir / name.replace("@", "-")
        cmd = [sys.executable, "-m", "cotune", "run", str(base), "--out", str(run),
               "--set", f"memory.backward={mode}", "--set", f"memory.keep={keep}"]  # fmt: skip
        log = open(runs_dir / f"{run.name}.log", "w")  # noqa: SIM115
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log), run, time.time())

    while todo or procs:
        while todo and len(procs) < a.parallel:
            launch(*todo.pop(0))
        time.sleep(5)
        for name, (proc, run, t0) in list(procs.items()):
            if proc.poll() is None:
                continue
            del procs[name]
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed: see {run}.log")
            summary = json.loads((run / "summary.json").read_text())
            metrics = [
                json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            ]
            (run / "trainable.safetensors").unlink(missing_ok=True)  # 90 MB of weights
            out[name] = {
                "accuracy": summary["metrics"]["accuracy"],
                "saved_activation_bytes": summary["saved_activation_bytes"],
                "device_peak_bytes": summary["device_peak_bytes"],
                "wall_s": summary["wall_s"],
                "curve": [(m["step"], m["accuracy"]) for m in metrics],
            }
            print(f"  {name:14s} accuracy {out[name]['accuracy']:.4f}  "
                  f"saved {summary['saved_activation_bytes'] / MiB:.1f} MiB  "
                  f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- report


def tables(res: dict[str, Any]) -> str:
    lines = []
    mem, tim = res.get("memory"), res.get("time")
    if mem:
        lines += [
            "| mode | keep | saved for backward (MiB) | vs none | peak RSS (MiB), glibc default "
            "| peak RSS (MiB), mmap threshold 64 KiB | step time vs none |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in mem.items():
            mode, _, keep = name.partition("@")
            ratio = f"{tim[name]['ratio_to_none']:.2f}x" if tim and name in tim else "-"
            lines.append(
                f"| {mode} | {keep or '-'} | {r['saved_activation_bytes'] / MiB:.1f} | "
                f"{r['saved_ratio']:.1f}x smaller | {r['peak_rss_bytes'] / MiB:.0f} | "
                f"{r.get('peak_rss_bytes_mmap', 0) / MiB:.0f} | {ratio} |"
            )
    acc = res.get("accuracy")
    if acc:
        ref = acc.get("none", {}).get("accuracy")
        lines += [
            "",
            "| mode | keep | SST-2 dev accuracy | vs none (points) |",
            "|---|---|---|---|",
        ]
        # `none` first; the runs finish (and are stored) in whatever order
        for name, r in sorted(acc.items(), key=lambda kv: kv[0] != "none"):
            mode, _, keep = name.partition("@")
            delta = f"{100 * (r['accuracy'] - ref):+.1f}" if ref is not None else "-"
            lines.append(f"| {mode} | {keep or '-'} | {r['accuracy']:.4f} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=["all", "memory", "time", "accuracy"], default="all")
    ap.add_argument("--keeps", default="0.1,0.3,0.5")
    ap.add_argument("--acc-keeps", default="0.1,0.3")
    ap.add_argument("--mem-steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for the time phase (other than 1: stored as time_threads<N>)",
    )  # fmt: skip
    ap.add_argument("--steps", type=int, default=400, help="SST-2 optimiser steps per run")
    ap.add_argument("--parallel", type=int, default=2, help="SST-2 runs at once")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "memory_backward"))
    ap.add_argument("--out", default=str(RESULTS / "memory_backward.json"))
    ap.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=float, default=1.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.keeps = [float(k) for k in str(a.keeps).split(",")]
    a.acc_keeps = [float(k) for k in str(a.acc_keeps).split(",")]

    if a.worker == "memory":
        print(json.dumps(worker_memory(a.mode, a.keep, a.mem_steps, 16, 128)))
        return
    if a.worker == "time":
        print(json.dumps(worker_time(a.keeps, a.rounds, 16, 128, a.threads)))
        return

    out = Path(a.out)
    setup = {
        "model": "minilm (all-MiniLM-L6-v2), full fine-tuning, AdamW, fp32, 1 thread",
        "memory_and_time": "bbc-news, batch 16 x 128 tokens (all real), cotune fit()",
        "accuracy": f"SST-2 ({SST2.relative_to(ROOT.parent)}), centralized, batch 16, "
        f"max 64 tokens, lr 5e-5, {a.steps} steps, seed 0, dev set (872)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
    }
    phases = ["memory", "time", "accuracy"] if a.phase == "all" else [a.phase]
    for phase in phases:
        print(f"== {phase}", flush=True)
        t0 = time.perf_counter()
        result = {"memory": phase_memory, "time": phase_time, "accuracy": phase_accuracy}[phase](a)
        # re-read: phases may run as separate, concurrent invocations on one file
        res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
        res["setup"] = {**res.get("setup", {}), **setup}
        key = f"time_threads{a.threads}" if phase == "time" and a.threads != 1 else phase
        res[key] = result
        res.setdefault("phase_wall_s", {})[key] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    print(tables(res))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
