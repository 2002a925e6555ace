"""Federated scale: fedlora on SST-2 (all-MiniLM-L6-v2) with 1000 virtual clients on
Flower's simulation runtime, 10% sampled per round, 3 rounds, 5% of the sampled clients
made to fail each round (`[federated.faults]`), against 100 clients all sampled (the
same 100 clients per round, the same work per client): memory should follow the
clients sampled per round, not the clients that exist.

Each run is `cotune run examples/sst2-fedlora.toml` with the overrides below on the
simulation engine (`flwr run` against a loopback simulation SuperLink; Ray actors as
virtual SuperNodes, two training at once on this 2-core machine). For every run the
script records the time of each round (from metrics.jsonl), the failures injected and
survived per round, the final accuracy, and the peak memory of the whole process tree
(this process, the SuperLink, the simulation process, Ray's services and workers),
sampled every 0.5 s: the summed RSS (shared pages counted once per process) and the
summed PSS (shared pages split between the processes that map them).

    nice .venv/bin/python benchmarks/federated_scale.py                # 1000, then 100
    nice .venv/bin/python benchmarks/federated_scale.py --clients 1000
    nice .venv/bin/python benchmarks/federated_scale.py --mode mixed   # raise + time out

Writes benchmarks/results/federated_scale.json (updated after every run) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cotune.report import read_summary  # noqa: E402
from cotune.report.run_folder import read_jsonl  # noqa: E402
from cotune.runtime.experiment import load_experiment, run_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLED = 100  # clients per round in both runs
COMMON = [
    "task.max_train_examples=20000",  # 20 phrases per client of 1000, 200 of 100
    "federated.rounds=3",
    "federated.local_steps=2",  # the same work per client in both runs
    "federated.faults.fail_fraction=0.05",
    "federated.faults.seed=0",
    "runtime.export=false",
]


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [pid], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory:
    """Peaks of the summed RSS and PSS of this process and all its descendants, and of
    their number."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(os.getpid())
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids) * 1024
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) * 1024
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(clients: int, mode: str, extra: list[str], out: Path) -> dict[str, Any]:
    fraction = SAMPLED / clients
    overrides = [
        *COMMON,
        f"federated.clients={clients}",
        f"federated.fraction={fraction}",
        f"federated.faults.mode={mode}",
        *extra,
    ]
    cfg = load_experiment(ROOT / "examples" / "sst2-fedlora.toml", overrides)
    t0 = time.perf_counter()
    with TreeMemory() as mem:
        path = run_experiment(cfg, out)
    wall = time.perf_counter() - t0
    summary = read_summary(path)
    rounds = read_jsonl(path / "metrics.jsonl")
    ends = [float(r["wall_s"]) for r in rounds]
    per_round = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    failed = sum(int(r["clients_failed"]) + int(r["clients_timed_out"]) for r in rounds)
    return {
        "clients": clients,
        "fraction": fraction,
        "sampled_per_round": [r["clients_sampled"] for r in rounds],
        "fault_mode": mode,
        "overrides": overrides,
        "run_dir": str(path),
        "rounds_completed": summary["rounds_completed"],
        "accuracy": summary["metrics"].get("accuracy"),
        "round_s": per_round,  # round 1 includes the start-up hand-shake with every node
        "mean_round_s_after_first": (
            sum(per_round[1:]) / len(per_round[1:]) if len(per_round) > 1 else None
        ),
        "faults_injected": [r.get("faults_injected", 0) for r in rounds],
        "clients_ok": [r["clients_ok"] for r in rounds],
        "clients_failed": [r["clients_failed"] for r in rounds],
        "clients_timed_out": [r["clients_timed_out"] for r in rounds],
        "failures_survived": failed,
        "wall_s": wall,
        "peak_tree_rss_bytes": mem.peak_rss,
        "peak_tree_pss_bytes": mem.peak_pss,
        "peak_tree_processes": mem.peak_processes,
        "server_peak_rss_bytes": summary.get("server_peak_rss_bytes"),
        "client_peak_rss_bytes": summary.get("device_peak_bytes"),
        "bytes_per_round": (summary["comm"]["bytes_up"] + summary["comm"]["bytes_down"])
        / max(int(summary["rounds_completed"]), 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    gib = 2**30
    lines = [
        "| clients | sampled/round | time per round (s) | faults injected / survived | "
        "peak RSS, tree | peak PSS, tree | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rounds = ", ".join(f"{s:.0f}" for s in r["round_s"])
        lines.append(
            f"| {r['clients']} | {SAMPLED} | {rounds} | {sum(r['faults_injected'])} / "
            f"{r['failures_survived']} | {r['peak_tree_rss_bytes'] / gib:.2f} GiB | "
            f"{r['peak_tree_pss_bytes'] / gib:.2f} GiB | {r['accuracy']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 100])
    parser.add_argument("--mode", choices=["raise", "timeout", "mixed"], default="raise")
    parser.add_argument("--set", action="append", default=[], help="extra override for every run")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-federated-scale"))
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "federated_scale.json")
    )
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    runs = results.setdefault("runs", {})
    for clients in args.clients:
        print(f"== fedlora, {clients} clients, {SAMPLED} per round, {args.mode}", flush=True)
        key = f"{clients}-{args.mode}"
        runs[key] = run_one(clients, args.mode, args.set, Path(args.runs) / key)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(table([runs[key]]), flush=True)
    print("\n" + table([runs[k] for k in sorted(runs, key=lambda k: -int(k.split("-")[0]))]))


if __name__ == "__main__":
    main()
