"""Federated fine-tuning on SST-2: fedavg vs fedlora vs fedkd (iid and Dirichlet
alpha 0.5), and fedlora with 100 virtual clients.

Each run is `cotune run examples/sst2-<method>.toml` on the simulation engine (Flower
+ Ray), same budget for all three methods (see the example files). For every run the
script records the per-round metrics, final accuracy, bytes per round (counted from
the serialised Flower messages, both directions), wall time, and the peak resident
memory of the whole process tree (this process, Ray's workers and services), sampled
every 0.5 s.

    nice .venv/bin/python benchmarks/federated.py                  # everything
    nice .venv/bin/python benchmarks/federated.py --only accuracy  # the 6 SST-2 runs
    nice .venv/bin/python benchmarks/federated.py --only scale     # 100 clients

Writes benchmarks/results/federated.json (updated after every run) and prints the
tables as Markdown.
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
METHODS = ("fedavg", "fedlora", "fedkd")
PARTITIONS = {"iid": [], "dirichlet-0.5": ["federated.partition=dirichlet", "federated.alpha=0.5"]}
SCALE = [
    "federated.clients=100",
    "federated.fraction=0.1",
    "federated.rounds=3",
    "task.max_train_examples=5000",
]


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


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


class TreePeakRSS:
    """Peak of the summed RSS of this process and all its descendants."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(_rss_kib(p) for p in _tree(os.getpid())) * 1024
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreePeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(method: str, overrides: list[str], out: Path) -> dict[str, Any]:
    cfg = load_experiment(ROOT / "examples" / f"sst2-{method}.toml", overrides)
    t0 = time.perf_counter()
    with TreePeakRSS() as mem:
        path = run_experiment(cfg, out)
    wall = time.perf_counter() - t0
    summary = read_summary(path)
    rounds = read_jsonl(path / "metrics.jsonl")
    n = max(int(summary["rounds_completed"]), 1)
    up, down = summary["comm"]["bytes_up"], summary["comm"]["bytes_down"]
    return {
        "method": method,
        "overrides": overrides,
        "run_dir": str(path),
        "accuracy": summary["metrics"].get("accuracy"),
        "rounds": n,
        "clients": cfg.federated.clients,
        "fraction": cfg.federated.fraction,
        "train_examples": cfg.task.max_train_examples,
        "bytes_up_per_round": up / n,
        "bytes_down_per_round": down / n,
        "bytes_per_round": (up + down) / n,
        "wall_s": wall,
        "peak_tree_rss_bytes": mem.peak_bytes,
        "server_peak_rss_bytes": summary.get("server_peak_rss_bytes"),
        "client_peak_rss_bytes": summary.get("device_peak_bytes"),
        "trainable": summary["trainable_params"],
        "per_round": [
            {
                k: r.get(k)
                for k in (
                    "round",
                    "accuracy",
                    "loss",
                    "train_loss",
                    "teacher_accuracy",
                    "round_bytes_up",
                    "round_bytes_down",
                    "wall_s",
                )
            }
            for r in rounds
        ],  # fmt: skip
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | final accuracy | bytes/round (up + down) | wall time |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['accuracy']:.4f} | {r['bytes_per_round'] / 1e6:,.2f} MB "
            f"({r['bytes_up_per_round'] / 1e6:,.2f} + {r['bytes_down_per_round'] / 1e6:,.2f}) "
            f"| {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["accuracy", "scale"])
    parser.add_argument(
        "--partitions", nargs="+", choices=list(PARTITIONS), default=list(PARTITIONS)
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--set", action="append", default=[], help="extra override for every run")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-federated"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federated.json"))
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    if args.only in (None, "accuracy"):
        for part in args.partitions:
            rows = results.setdefault("sst2", {}).setdefault(part, {})
            for method in args.methods:
                print(f"== {part} {method}", flush=True)
                rows[method] = run_one(
                    method, PARTITIONS[part] + args.set, Path(args.runs) / f"{part}-{method}"
                )
                save()
            done = [rows[m] for m in METHODS if m in rows]
            if "fedavg" in rows and "fedlora" in rows:
                ratio = rows["fedavg"]["bytes_per_round"] / rows["fedlora"]["bytes_per_round"]
                results["sst2"][f"{part}-fedavg-over-fedlora-bytes"] = ratio
                print(f"fedavg moves {ratio:.0f}x the bytes of fedlora per round")
            print(f"\nSST-2, {part}\n" + table(done) + "\n", flush=True)
            save()
    if args.only in (None, "scale"):
        print("== scale: fedlora, 100 clients, fraction 0.1, 3 rounds", flush=True)
        results["scale"] = run_one(
            "fedlora", SCALE + args.set, Path(args.runs) / "scale-fedlora-100"
        )
        s = results["scale"]
        print(
            f"wall {s['wall_s']:.0f} s, peak RSS of the process tree {s['peak_tree_rss_bytes'] / 2**30:.2f} GiB, "
            f"final accuracy {s['accuracy']:.4f}",
            flush=True,
        )
        save()


if __name__ == "__main__":
    main()
