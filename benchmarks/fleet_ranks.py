"""fedlora on SST-2 with a fleet of heterogeneous LoRA ranks against a uniform one.

Ten devices (minilm, examples/sst2-fedlora.toml's task and batch) train for a few
rounds of a few local steps each on a 2,000-phrase subsample, iid; the server scores
the global model on the 872-sentence dev set after every round. Fleets:

- `uniform-8`: every device rank 8 (plain fedlora);
- `ranks-4-8-16`: devices of ranks 4, 8, 16, 4, 8, ... (HetLoRA, zero padding);
- `ranks-4-8-16-rank_wise`: the same fleet, each rank component averaged over the
  devices that hold it;
- `net-uniform-8`, `net-ranks-4-8-16` (not run by default): uniform-8 and ranks-4-8-16
  with the devices on three named links (examples/fleets/three-networks-*.toml: client
  k on constrained / lte / wifi for k mod 3 = 0 / 1 / 2, the rank-4 devices on
  constrained); besides accuracy, each round's projected wall time (`projected`: the
  server's time + the slowest client's training + the round's network time on the
  clock, where each call waits for its slowest client's link).

Every fleet uses the same LoRA scale alpha / r_max = 2 (alpha 16 at rank 8, 32 at
rank 16), so a rank component means the same update in both. The inline engine runs
the clients one after another in this process (no Ray): the least overhead on a
small machine. Per fleet: accuracy and loss per round, bytes per round and per device.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fleet_ranks.py
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fleet_ranks.py --rounds 3 --fleets uniform-8
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fleet_ranks.py \
        --fleets net-uniform-8 net-ranks-4-8-16

Writes benchmarks/results/fleet_ranks.json (updated after every run) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cotune.report import read_summary  # noqa: E402
from cotune.report.run_folder import read_jsonl  # noqa: E402
from cotune.runtime.experiment import load_experiment, run_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FLEETS: dict[str, list[str]] = {
    "uniform-8": ["federated.client_ranks=[8]", "model.lora.r=8", "model.lora.alpha=16"],
    "ranks-4-8-16": ["federated.client_ranks=[4,8,16]", "model.lora.r=16", "model.lora.alpha=32"],
    "ranks-4-8-16-rank_wise": [
        "federated.client_ranks=[4,8,16]",
        "model.lora.r=16",
        "model.lora.alpha=32",
        "federated.rank_aggregation=rank_wise",
    ],
    # the same fleets on three named links (examples/fleets/three-networks-*.toml:
    # client k is device k mod 3 = constrained / lte / wifi; rank 4 / 8 / 16 on them)
    "net-uniform-8": [
        f"federated.fleet={ROOT / 'examples' / 'fleets' / 'three-networks-rank8.toml'}",
        "model.lora.r=8",
        "model.lora.alpha=16",
        "link.network.profile=wifi",
    ],
    "net-ranks-4-8-16": [
        f"federated.fleet={ROOT / 'examples' / 'fleets' / 'three-networks-ranks.toml'}",
        "model.lora.r=16",
        "model.lora.alpha=32",
        "link.network.profile=wifi",
    ],
}
DEFAULT_FLEETS = ["uniform-8", "ranks-4-8-16", "ranks-4-8-16-rank_wise"]


def budget(args: argparse.Namespace) -> list[str]:
    return [
        f"federated.clients={args.clients}",
        f"federated.rounds={args.rounds}",
        f"federated.local_steps={args.local_steps}",
        "federated.fraction=1.0",
        f"task.max_train_examples={args.train_examples}",
        "runtime.engine=inline",
        "runtime.checkpoint=false",
        "train.threads=1",
        f"seed={args.seed}",
    ]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    cfg = load_experiment(ROOT / "examples" / "sst2-fedlora.toml", overrides)
    t0, c0 = time.perf_counter(), cpu_s()
    path = run_experiment(cfg, out)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    summary = read_summary(path)
    rounds = read_jsonl(path / "metrics.jsonl")
    devices = cfg.federated.devices
    ranks = cfg.federated.client_ranks or [d.rank or cfg.model.lora.r for d in devices]
    clients = summary.get("client_bytes") or {}
    return {
        "fleet": name,
        "overrides": overrides,
        "run_dir": str(path),
        "accuracy": summary["metrics"].get("accuracy"),
        "per_round": [
            {
                k: r.get(k)
                for k in (
                    "round",
                    "accuracy",
                    "loss",
                    "train_loss",
                    "round_bytes_up",
                    "round_bytes_down",
                )
            }
            for r in rounds
        ],  # fmt: skip
        "bytes_up": summary["comm"]["bytes_up"],
        "bytes_down": summary["comm"]["bytes_down"],
        "per_device": [
            {"partition": int(p), "rank": ranks[int(p) % len(ranks)] if ranks else None, **b}
            for p, b in clients.items()
        ],
        "trainable_global": summary["trainable_params"]["device"],
        "wall_s": wall,
        "cpu_s": cpu,
        **({"projected": projected(rounds, devices)} if cfg.link.network else {}),
    }


def projected(rounds: list[dict[str, Any]], devices: list[Any]) -> dict[str, Any]:
    """Each round's projected wall time with the devices training side by side.

    The inline engine trains the clients one after another, so the run's own
    `projected_wall_s` (its wall time plus the clock's network time) adds every
    client's training. Here a round costs: the server's own time (the round's wall
    time minus all its clients' training, `client_train_s_total`: aggregation,
    serialization, the dev-set evaluation), plus the slowest client's training
    (`client_train_s_max`; every device computes at this machine's speed), plus the
    round's network time on the clock (each call waits for its slowest client's link)."""
    out, total, prev_wall, prev_net = [], 0.0, 0.0, 0.0
    for r in rounds:
        net = r["projected_wall_s"] - r["wall_s"] - prev_net
        server = r["wall_s"] - prev_wall - r["client_train_s_total"]
        rnd = server + r["client_train_s_max"] + net
        total += rnd
        out.append({"round": r["round"], "accuracy": r.get("accuracy"), "server_s": server,
                    "slowest_train_s": r["client_train_s_max"],
                    "all_train_s": r["client_train_s_total"], "network_s": net,
                    "round_s": rnd, "projected_s": total})  # fmt: skip
        prev_wall, prev_net = r["wall_s"], r["projected_wall_s"] - r["wall_s"]
    return {
        "devices": [d.model_dump() for d in devices],
        "per_round": out,
        "projected_s": total,
        "run_projected_wall_s": rounds[-1]["projected_wall_s"],
        "note": " ".join((projected.__doc__ or "").split()),
    }


def table(rows: list[dict[str, Any]]) -> str:
    n = max(len(r["per_round"]) for r in rows)
    head = " | ".join(f"round {i + 1}" for i in range(n))
    lines = [f"| fleet | {head} | MB/round (up + down) | wall |", "|---|" + "---|" * (n + 2)]
    for r in rows:
        accs = " | ".join(f"{x['accuracy']:.4f}" for x in r["per_round"])
        per = (r["bytes_up"] + r["bytes_down"]) / max(len(r["per_round"]), 1) / 1e6
        lines.append(f"| {r['fleet']} | {accs} | {per:.2f} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def network_table(rows: list[dict[str, Any]]) -> str:
    """Per round: accuracy and the projected wall time so far (minutes)."""
    n = max(len(r["per_round"]) for r in rows)
    head = " | ".join(f"round {i + 1}" for i in range(n))
    lines = [f"| fleet | {head} | network s / round | slowest training s / round |",
             "|---|" + "---|" * (n + 2)]  # fmt: skip
    for r in rows:
        p = r["projected"]["per_round"]
        cells = " | ".join(f"{x['accuracy']:.4f} @ {x['projected_s'] / 60:.1f} min" for x in p)
        net = sum(x["network_s"] for x in p) / len(p)
        train = sum(x["slowest_train_s"] for x in p) / len(p)
        lines.append(f"| {r['fleet']} | {cells} | {net:.1f} | {train:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleets", nargs="+", choices=list(FLEETS), default=DEFAULT_FLEETS)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra override for every run")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-fleet-ranks"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet_ranks.json"))
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    results["budget"] = budget(args) + args.set
    runs = results.setdefault("runs", {})
    for name in args.fleets:
        print(f"== {name}", flush=True)
        runs[name] = run_one(name, budget(args) + FLEETS[name] + args.set,
                             Path(args.runs) / f"seed-{args.seed}" / name)  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table([runs[n] for n in FLEETS if n in runs]), flush=True)
    with_network = [runs[n] for n in FLEETS if n in runs and "projected" in runs[n]]
    if with_network:
        print("\n" + network_table(with_network), flush=True)


if __name__ == "__main__":
    main()
