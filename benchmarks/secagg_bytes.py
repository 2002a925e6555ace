"""What SecAgg+ adds to a federated round's traffic: the same one-round run with and
without `federated.secagg`, bytes up and down per stage as cotune counts them (the
serialised Flower messages), and the factor over plain FedAvg.

A tiny synthetic SST-2-layout folder (bytes do not depend on the text), 4 clients,
one round of 2 local steps, the inline engine. Runs (model:method): tiny-bert with
fedlora and fedavg, minilm with fedlora (minilm's fedavg masks 22.7M values per
client: several GB of int64 masks on the inline engine).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/secagg_bytes.py
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/secagg_bytes.py --runs tiny-bert:fedlora

Writes benchmarks/results/secagg_bytes.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from cotune.config import build_config
from cotune.methods import resolve
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.engine import run_federated
from cotune.runtime.federated.grid import CountingGrid

RESULTS = Path(__file__).parent / "results" / "secagg_bytes.json"
STAGES = ["setup", "share keys", "collect masked vectors", "unmask"]


def write_sst2(root: Path, n: int = 80) -> Path:
    d = root / "SST-2"
    d.mkdir(parents=True, exist_ok=True)
    words = [("good", 1), ("great", 1), ("bad", 0), ("dull", 0)]
    rows = [f"the film is {w} number {i}\t{y}" for i in range(n) for w, y in [words[i % 4]]]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:16]) + "\n")
    return d


def one_round(data: Path, run_dir: Path, method: str, model: str, secagg: bool) -> dict[str, Any]:
    calls: list[tuple[int, int]] = []
    real = CountingGrid.send_and_receive

    def spy(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        down0, up0 = self.bytes_down, self.bytes_up
        replies = real(self, messages, timeout=timeout)
        calls.append((self.bytes_up - up0, self.bytes_down - down0))
        return replies

    CountingGrid.send_and_receive = spy  # type: ignore[method-assign]
    try:
        cfg = resolve(
            build_config(
                {
                    "method": method,
                    "task": {"name": "glue/sst2", "data_dir": str(data), "max_eval_examples": 16},
                    "model": {"name": model},
                    "train": {"batch_size": 8, "max_seq_len": 24, "threads": 1},
                    "federated": {"clients": 4, "rounds": 1, "local_steps": 2, "secagg": secagg},
                    "runtime": {"export": False},
                }
            )
        )
        run_federated(cfg, run_dir, engine="inline")
    finally:
        CountingGrid.send_and_receive = real  # type: ignore[method-assign]
    (row,) = read_jsonl(run_dir / "metrics.jsonl")
    round_calls = calls[1:]  # after the start-up hand-shake
    stages = STAGES if secagg else ["train"]
    return {
        "round_bytes_up": row["round_bytes_up"],
        "round_bytes_down": row["round_bytes_down"],
        "stages": {s: {"up": u, "down": d} for s, (u, d) in zip(stages, round_calls, strict=False)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--runs", nargs="+", default=["tiny-bert:fedlora", "tiny-bert:fedavg", "minilm:fedlora"]
    )
    args = ap.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_sst2(Path(tmp))
        for run in args.runs:
            model, method = run.split(":")
            plain = one_round(data, Path(tmp) / f"{run}-0", method, model, False)
            secure = one_round(data, Path(tmp) / f"{run}-1", method, model, True)
            masked_up = secure["stages"]["collect masked vectors"]["up"]
            results.append(
                {
                    "model": model, "method": method, "plain": plain, "secagg": secure,
                    "up_factor": secure["round_bytes_up"] / plain["round_bytes_up"],
                    "down_factor": secure["round_bytes_down"] / plain["round_bytes_down"],
                    "masked_vectors_up_factor": masked_up / plain["round_bytes_up"],
                }
            )  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("| model | method | plain up / down (kB) | SecAgg+ up / down (kB) | up factor | "
          "masked vectors alone | down factor |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        p, s = r["plain"], r["secagg"]
        print(
            f"| {r['model']} | {r['method']} | {p['round_bytes_up'] / 1e3:.1f} / "
            f"{p['round_bytes_down'] / 1e3:.1f} | {s['round_bytes_up'] / 1e3:.1f} / "
            f"{s['round_bytes_down'] / 1e3:.1f} | {r['up_factor']:.2f}x | "
            f"{r['masked_vectors_up_factor']:.2f}x | {r['down_factor']:.2f}x |"
        )


if __name__ == "__main__":
    main()
