"""`cotune plan`'s predictions against real runs on this machine (issue 18, done-when 3).

Ten planned configurations of minilm on BBC News (batch 4 x 64 tokens, every row full)
are run for real with `cotune memory --steps N` (one process per row; split devices in
their own process over loopback gRPC, so the peak is the device's): the device's peak
RSS and the median step time against the planner's prediction. The planner's constants
are fitted on the even-numbered rows (least squares) and checked on the odd-numbered
ones; `src/cotune/planner/calibration.json` gets the fitted constants. With
`--passes P` every row runs P times, pass after pass; a row's step time is its
smallest median (other jobs on a shared machine only ever slow a step down), its peak
the largest. Each run's load average is recorded (load.json; in the JSON).

Command: OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/plan_check.py --steps 8
--passes 2  (resumable; results: benchmarks/results/plan_check.json)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from cotune.data.registry import load_task
from cotune.link.network import PROFILES
from cotune.planner.calibration import Calibration, load_calibration, save_calibration
from cotune.planner.facts import FactFinder
from cotune.planner.plan import Candidate, batch_shape, candidate_config
from cotune.planner.predict import compute_s, peak_mib
from cotune.planner.speed import profile_gflops
from cotune.report import read_summary
from cotune.runtime.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "plan_check"
BASE = str(ROOT / "examples" / "bbc-news-centralized.toml")
SETS = ["train.batch_size=4", "train.max_seq_len=64", "train.threads=1"]
ROWS = [
    Candidate("centralized", None, None, None, "none"),
    Candidate("centralized", None, None, None, "checkpoint"),
    Candidate("centralized", None, None, 8, "none"),
    Candidate("centralized", None, None, 8, "checkpoint"),
    Candidate("split", 2, "identity", None, "none"),
    Candidate("split", 3, "int8", None, "none"),
    Candidate("split", 4, "sft8-int8", None, "none"),
    Candidate("split", 3, "int8", 8, "none"),
    Candidate("split", 2, "identity", None, "checkpoint"),
    Candidate("centralized", None, None, None, "norm@0.1"),
]


def run_dir(i: int, p: int) -> Path:
    """Row `i`'s run folder in pass `p` (1: the first)."""
    return OUT / (f"row{i}" if p == 1 else f"row{i}-pass{p}")


def run_row(i: int, p: int, toml: Path, steps: int) -> None:
    """Run row `i` (pass `p`) with `cotune memory` unless its folder has a summary;
    the load average before and after it goes to load.json."""
    out = run_dir(i, p)
    if (out / "summary.json").is_file():
        return
    args = [sys.executable, "-m", "cotune", "--quiet", "memory", str(toml), "--steps",
            str(steps), "--out", str(out)]  # fmt: skip
    before, t0 = os.getloadavg(), time.time()
    subprocess.run(args, check=True, capture_output=True, text=True)
    load = {"loadavg_before": before, "loadavg_after": os.getloadavg(),
            "run_s": time.time() - t0, "cpus": os.cpu_count()}  # fmt: skip
    (out / "load.json").write_text(json.dumps(load) + "\n")


def measure_one(out: Path, tokens: int) -> dict[str, Any]:
    s = read_summary(out)
    last = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines() if x][-1]
    load_file = out / "load.json"
    return {"peak_mib": s["device_peak_bytes"] / 2**20, "step_s": s["step_s_median"],
            "mean_step_s": tokens / last["tokens_per_s"],
            "load": json.loads(load_file.read_text()) if load_file.is_file() else None}  # fmt: skip


def measure(i: int, passes: int, tokens: int) -> dict[str, Any]:
    """Peak RSS of the device process (the largest over the passes); the median step
    time (summary.json's `step_s_median`: the first step's warm-up left out), the
    smallest over the passes (the one least slowed by other jobs on the machine); each
    pass's figures, with the mean step time from the run's training throughput
    (`tokens_per_s` over the steps, `tokens` a batch: every row full) and the load."""
    each = [measure_one(run_dir(i, p), tokens) for p in range(1, passes + 1)]
    return {"peak_mib": max(m["peak_mib"] for m in each),
            "step_s": min(m["step_s"] for m in each), "passes": each}  # fmt: skip


def fit(rows: list[dict], cal: Calibration) -> Calibration:
    a = np.array([[r["saved_mib"], 1.0] for r in rows])
    y = np.array([r["measured"]["peak_mib"] - r["fixed_mib"] for r in rows])
    (saved_scale, overhead), *_ = np.linalg.lstsq(a, y, rcond=None)
    t = np.array([[r["flops_s"], r["trainable_m"]] for r in rows])
    ty = np.array([r["measured"]["step_s"] for r in rows])
    # non-negative: a negative time per parameter would make large models' steps free
    (flops_scale, per_mparam), _ = nnls(t, ty)
    return replace(
        cal, saved_scale=float(saved_scale), overhead_mib=float(overhead), grad_scale=1.0,
        flops_scale=float(flops_scale), per_mparam_s=float(per_mparam),
        source="fitted on benchmarks/results/plan_check.json rows 0, 2, 4, 6, 8 (of 0-9)",
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--passes", type=int, default=1,
                    help="measure every row this many times (step time: the smallest)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    base = load_experiment(BASE, SETS)
    task = load_task(base.task, base.seed)
    shape = batch_shape(base, task.train)
    gflops_file = OUT / "gflops.json"  # profiled once: a refit reuses it (reproducible)
    if gflops_file.is_file():
        gflops = float(json.loads(gflops_file.read_text())["gflops"])
    else:
        gflops = profile_gflops(base, shape.batch, shape.length)
        gflops_file.write_text(json.dumps({"gflops": gflops, "loadavg": os.getloadavg()}) + "\n")
    finder = FactFinder(task.num_labels, shape.length)
    raw = Calibration(runtime_mib=load_calibration().runtime_mib)
    from cotune.config import to_toml

    configs = [candidate_config(base, c, 1) for c in ROWS]
    for i, cfg in enumerate(configs):
        (OUT / f"row{i}.toml").write_text(to_toml(cfg))
    for p in range(1, args.passes + 1):  # pass after pass: a burst of load hits one pass
        for i, c in enumerate(ROWS):
            run_row(i, p, OUT / f"row{i}.toml", args.steps)
            got = measure_one(run_dir(i, p), shape.batch * shape.length)
            print(f"pass {p} row {i} {c.label}: {got}", flush=True)
    rows = []
    for i, c in enumerate(ROWS):
        cfg = configs[i]
        facts = finder.facts(cfg, split=c.method == "split")
        measured = measure(i, args.passes, shape.batch * shape.length)
        unit = replace(raw, saved_scale=0.0, grad_scale=1.0, overhead_mib=0.0)
        rows.append({
            "row": i, "config": c.label, "measured": measured,
            "fixed_mib": peak_mib(facts, shape.batch, cfg.train.optimizer, unit),
            "saved_mib": facts.saved_bytes_per_example * shape.batch / 2**20,
            "flops_s": compute_s(facts, shape, gflops, gflops, replace(raw, per_mparam_s=0.0)),
            "trainable_m": (facts.trainable + facts.cloud_trainable) / 1e6,
            "facts": facts, "cfg": cfg,
        })  # fmt: skip
    cal = fit([r for r in rows if r["row"] % 2 == 0], raw)
    save_calibration(cal)
    table = []
    for r in rows:
        f, cfg = r.pop("facts"), r.pop("cfg")
        pred_peak = peak_mib(f, shape.batch, cfg.train.optimizer, cal)
        pred_step = compute_s(f, shape, gflops, gflops, cal) + 0.0  # loopback: no network
        m = r["measured"]
        table.append({
            **{k: r[k] for k in ("row", "config", "measured")},
            "set": "fit" if r["row"] % 2 == 0 else "check",
            "predicted": {"peak_mib": pred_peak, "step_s": pred_step},
            "ratio": {"peak": pred_peak / m["peak_mib"], "step": pred_step / m["step_s"]},
            "uncalibrated": {"peak_mib": r["fixed_mib"] + r["saved_mib"], "step_s": r["flops_s"]},
        })  # fmt: skip
    for t in table:  # each check row against the fit row run just before it, pass by pass
        if t["set"] != "check":
            continue
        ref = table[t["row"] - 1]
        pairs = zip(t["measured"]["passes"], ref["measured"]["passes"], strict=True)
        measured = [a["step_s"] / b["step_s"] for a, b in pairs]
        predicted = t["predicted"]["step_s"] / ref["predicted"]["step_s"]
        t["same_pass"] = {
            "against_row": ref["row"], "predicted_ratio": predicted,
            "measured_ratio_per_pass": measured,
            "measured_ratio_median": float(np.median(measured)),
            "error": predicted / float(np.median(measured)) - 1,
        }  # fmt: skip
    check = [t for t in table if t["set"] == "check"]
    result = {
        "command": f"benchmarks/plan_check.py --steps {args.steps} --passes {args.passes}",
        "setup": {"base": "examples/bbc-news-centralized.toml", "sets": SETS,
                  "shape": vars(shape), "gflops_profiled": gflops,
                  "network": "loopback (none emulated)", "profiles": list(PROFILES),
                  "loadavg_at_end": os.getloadavg(), "cpus": os.cpu_count()},
        "calibration": cal.as_dict(),
        "rows": table,
        "check_within": {
            "peak_15pct": all(abs(t["ratio"]["peak"] - 1) <= 0.15 for t in check),
            "step_20pct": all(abs(t["ratio"]["step"] - 1) <= 0.20 for t in check),
        },
    }  # fmt: skip
    result["markdown"] = markdown(table)
    path = ROOT / "benchmarks" / "results" / "plan_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"], flush=True)


def markdown(table: list[dict[str, Any]]) -> str:
    """The README table: predicted against measured, per row, with the errors."""
    lines = ["| row | set | configuration | peak MiB predicted / measured | error | "
             "step s predicted / measured (per pass) | error | same-pass ratio error |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in table:
        pr, me = t["predicted"], t["measured"]
        passes = ", ".join(f"{p['step_s']:.3f}" for p in me["passes"])
        same = f"{t['same_pass']['error']:+.0%}" if "same_pass" in t else ""
        lines.append(
            f"| {t['row']} | {t['set']} | {t['config']} | {pr['peak_mib']:.0f} / "
            f"{me['peak_mib']:.0f} | {t['ratio']['peak'] - 1:+.1%} | {pr['step_s']:.3f} / "
            f"{me['step_s']:.3f} ({passes}) | {t['ratio']['step'] - 1:+.0%} | {same} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
