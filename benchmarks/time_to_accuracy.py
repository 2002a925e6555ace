"""Time to a target accuracy on SST-2 under named network profiles (README "Time to
accuracy").

Arms (minilm, SST-2, a seeded 2,000-phrase subsample, batch 16 x 64 tokens, the
872-sentence dev set scored at every evaluation, seed 0, one thread):

- `centralized`: full fine-tuning in one place (the reference: no network; the data is
  taken to be where the compute is);
- `split-identity`, `split-int8`, `split-sft8-int8`: split fine-tuning at cut 4 (the
  device runs the embeddings and layers 0-3) with the full-width activations, int8
  activations, or the SFT rank-8 code in int8; full fine-tuning on both sides;
- `fedlora`: LoRA r8 fedlora over 10 devices (iid), 8 local steps per round, 5 rounds:
  the `net-uniform-8` run of benchmarks/fleet_ranks.py (the same task, subsample,
  batch and length), not run here.

The centralized and split arms train 100 steps of batch 16 (0.8 epoch of the
subsample; lr 1e-4, 6% warmup, linear decay) and are scored every 20 steps; they run in
process (`runtime.transport = "inprocess"`: no network, so each evaluation's `wall_s`
is compute only). Each evaluation's time under a profile is then projected by
cotune's clock (`cotune.link.network.transfer_s`, per message): its measured `wall_s`
plus, for split, the messages so far (one up and one down per training step at the
run's mean training message size, one up and one down per evaluation batch at the mean
evaluation message size, and the control messages), each costed on the profile's link;
for fedlora, per round, the server's own time plus the slowest client's training plus
one client's exchange on the profile (its model down, its update up: every device on
that profile; benchmarks/fleet_ranks.py's `projected` figures). Compute is this
machine's on both sides of the link: the device is taken to be as fast as the cloud.

The time to a target is the projected time of the first evaluation at or above it
(evaluations every 20 steps / every round: a time is an upper bound at that grain).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/time_to_accuracy.py

Resumable (an arm whose run folder has a summary.json is not run again). Writes
benchmarks/results/time_to_accuracy.json, benchmarks/results/time_to_accuracy.png
and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cotune.link.accounting import DOWN, UP  # noqa: E402
from cotune.link.network import PROFILES, NetworkSpec, exchange_s, transfer_s  # noqa: E402
from cotune.report import read_summary  # noqa: E402
from cotune.report.run_folder import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "time_to_accuracy"
BASE = ROOT / "examples" / "sst2-split-sft.toml"
COMMON = [
    "task.max_train_examples=2000",
    "train.steps=100",
    "train.batch_size=16",
    "train.max_seq_len=64",
    "train.lr=1e-4",
    "train.eval_every=20",
    "train.threads=1",
    "split.cut=4",
    "runtime.transport=inprocess",
    "runtime.checkpoint=false",
]
ARMS: dict[str, list[str]] = {
    "centralized": ["method=centralized"],
    "split-identity": ["link.codec=identity"],
    "split-int8": ["link.codec=int8"],
    "split-sft8-int8": ["link.codec=sft", "link.rank=8", "link.code_format=int8"],
}
PROFILE_NAMES = ["wifi", "lte", "constrained"]
TARGETS = [0.75, 0.80]
REUSED_TARGETS = [0.85, 0.88]
FLEET_JSON = ROOT / "benchmarks" / "results" / "fleet_ranks.json"
FEDLORA_RUN = "net-uniform-8"


def run_arm(name: str, seed: int) -> Path:
    from cotune.runtime.experiment import load_experiment, run_experiment

    out = OUT / name / f"seed-{seed}"
    if (out / "summary.json").is_file():
        return out
    sets = COMMON + ARMS[name] + [f"seed={seed}", f'name="tta-{name}"']
    cfg = load_experiment(str(BASE), sets)
    before, t0 = os.getloadavg(), time.time()
    run_experiment(cfg, out)
    load = {"loadavg_before": before, "loadavg_after": os.getloadavg(),
            "run_s": time.time() - t0, "cpus": os.cpu_count(), "sets": sets}  # fmt: skip
    (out / "load.json").write_text(json.dumps(load, indent=1) + "\n")
    shutil.rmtree(out / "model", ignore_errors=True)  # the saved weights: not needed here
    return out


def split_messages(summary: dict[str, Any], evals: int) -> dict[str, Any]:
    """The mean message sizes of a split run per phase, from its link counters."""
    link = summary["link"]
    steps = int(summary["steps"])
    phase = link["by_phase"]
    control = 1  # the hello (up) and its answer (down)
    eval_msgs = (int(link["messages_up"]) - steps - control) / max(evals, 1)
    if eval_msgs != int(eval_msgs) or int(link["messages_up"]) != int(link["messages_down"]):
        raise RuntimeError(f"unexpected message counts in {link}")
    per_eval = int(eval_msgs)
    return {
        "steps": steps,
        "eval_messages_per_eval": per_eval,
        "train_up": phase["train"]["up"] / steps,
        "train_down": phase["train"]["down"] / steps,
        "eval_up": phase["eval"]["up"] / max(per_eval * evals, 1),
        "eval_down": phase["eval"]["down"] / max(per_eval * evals, 1),
        "control_up": phase["control"]["up"],
        "control_down": phase["control"]["down"],
    }


def split_network_s(spec: NetworkSpec, m: dict[str, Any], steps: int, evals: int) -> float:
    def pair(up: float, down: float) -> float:
        return transfer_s(spec, UP, round(up)) + transfer_s(spec, DOWN, round(down))

    return (
        pair(m["control_up"], m["control_down"])
        + steps * pair(m["train_up"], m["train_down"])
        + evals * m["eval_messages_per_eval"] * pair(m["eval_up"], m["eval_down"])
    )


def local_curve(path: Path) -> dict[str, Any]:
    summary = read_summary(path)
    rows = read_jsonl(path / "metrics.jsonl")
    split = summary.get("link") is not None
    msgs = split_messages(summary, len(rows)) if split else None
    points = []
    for k, r in enumerate(rows, start=1):
        net = {
            p: (split_network_s(PROFILES[p], msgs, int(r["step"]), k) if msgs else 0.0)
            for p in PROFILE_NAMES
        }
        points.append({"step": r["step"], "accuracy": r["accuracy"],
                       "bytes": r["bytes_up"] + r["bytes_down"], "compute_s": r["wall_s"],
                       "network_s": net,
                       "projected_s": {p: r["wall_s"] + net[p] for p in PROFILE_NAMES}})  # fmt: skip
    load_file = path / "load.json"
    return {
        "run_dir": str(path.relative_to(ROOT)),
        "messages": msgs,
        "load": json.loads(load_file.read_text()) if load_file.is_file() else None,
        "points": points,
    }


def fedlora_curve(fleet: dict[str, Any]) -> dict[str, Any]:
    """fedlora's rounds from benchmarks/fleet_ranks.py's `net-uniform-8` run: every
    device on one profile, each round's exchange is one client's messages."""
    run = fleet["runs"][FEDLORA_RUN]
    clients = len(run["per_device"])
    points, compute, network = [], 0.0, {p: 0.0 for p in PROFILE_NAMES}
    sent = 0
    for r, pr in zip(run["per_round"], run["projected"]["per_round"], strict=True):
        compute += pr["server_s"] + pr["slowest_train_s"]
        down = round(r["round_bytes_down"] / clients)
        up = round(r["round_bytes_up"] / clients)
        sent += r["round_bytes_up"] + r["round_bytes_down"]
        for p in PROFILE_NAMES:
            network[p] += exchange_s(PROFILES[p], [down], [up])
        points.append({"round": r["round"], "accuracy": r["accuracy"], "bytes": sent,
                       "compute_s": compute, "network_s": dict(network),
                       "message_bytes": {"down": down, "up": up},
                       "projected_s": {p: compute + network[p] for p in PROFILE_NAMES}})  # fmt: skip
    return {"run": f"benchmarks/results/fleet_ranks.json runs.{FEDLORA_RUN}",
            "run_dir": run["run_dir"], "clients": clients, "points": points}  # fmt: skip


def time_to(points: list[dict[str, Any]], target: float, profile: str) -> dict[str, Any] | None:
    for p in points:
        if p["accuracy"] >= target:
            at = p.get("step", p.get("round"))
            return {"s": p["projected_s"][profile], "network_s": p["network_s"][profile],
                    "compute_s": p["compute_s"], "at": at, "bytes": p["bytes"]}  # fmt: skip
    return None


def fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s" if s >= 1 else f"{s:.2f} s"


def table(curves: dict[str, dict[str, Any]], targets: list[float] = TARGETS) -> str:
    """One row per arm and target: where it was first reached, the bytes moved and the
    compute so far, and the projected time on each profile (of which network)."""
    head = " | ".join(PROFILE_NAMES)
    lines = [f"| arm | best accuracy | target | reached at | MB moved | compute | {head} |",
             "|---|---|---|---|---|---|" + "---|" * len(PROFILE_NAMES)]  # fmt: skip
    for name, c in curves.items():
        best = max(p["accuracy"] for p in c["points"])
        unit = "step" if "step" in c["points"][0] else "round"
        for t in targets:
            hit = time_to(c["points"], t, PROFILE_NAMES[0])
            if hit is None:
                lines.append(f"| {name} | {best:.4f} | {t:.2f} | not reached | | |"
                             + " |" * len(PROFILE_NAMES))  # fmt: skip
                continue
            cells = []
            for prof in PROFILE_NAMES:
                h = time_to(c["points"], t, prof)
                assert h is not None
                net = f" (net {fmt_s(h['network_s'])})" if h["network_s"] > 0 else ""
                cells.append(fmt_s(h["s"]) + net)
            lines.append(f"| {name} | {best:.4f} | {t:.2f} | {unit} {hit['at']} | "
                         f"{hit['bytes'] / 1e6:.1f} | {fmt_s(hit['compute_s'])} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def reused_curves() -> dict[str, dict[str, Any]]:
    """The SST-2 runs of benchmarks/split_sft.py (1,000 steps of batch 32, max 64
    tokens, all 67,349 phrases, scored every 250 steps; centralized and sft r8 int8 at
    cut 4 with 3 seeds, identity at cut 4 with one), projected the same way."""
    root = ROOT / "benchmarks" / "results" / "split_sft" / "sst2"
    arms = {"centralized": "centralized", "split-identity": "identity-cut4",
            "split-sft8-int8": "sft8-int8-cut4"}  # fmt: skip
    out = {}
    for name, folder in arms.items():
        for seed_dir in sorted((root / folder).glob("seed-*")):
            if (seed_dir / "summary.json").is_file():
                out[f"{name} {seed_dir.name}"] = local_curve(seed_dir)
    return out


def plot(curves: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROFILE_NAMES), figsize=(5 * len(PROFILE_NAMES), 4),
                             sharey=True)  # fmt: skip
    for ax, prof in zip(axes, PROFILE_NAMES, strict=True):
        for name, c in curves.items():
            xs = [p["projected_s"][prof] / 60 for p in c["points"]]
            ys = [p["accuracy"] for p in c["points"]]
            ax.plot(xs, ys, marker="o", label=name)
        for t in TARGETS:
            ax.axhline(t, color="grey", lw=0.8, ls="--")
        spec = PROFILES[prof]
        ax.set_title(f"{prof} ({spec.up_mbps:g} up / {spec.down_mbps:g} down Mbit/s, "
                     f"{spec.latency_ms:g} ms)", fontsize=9)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("projected wall time (min, log)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SST-2 dev accuracy (872)")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Time to accuracy on SST-2 (minilm, seed 0): cotune's clock on named profiles",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true",
                        help="do not run arms that are missing; tabulate what exists")  # fmt: skip
    args = parser.parse_args()
    curves: dict[str, dict[str, Any]] = {}
    for name in args.arms:
        out = OUT / name / f"seed-{args.seed}"
        if not args.report_only:
            print(f"== {name}", flush=True)
            run_arm(name, args.seed)
        if (out / "summary.json").is_file():
            curves[name] = local_curve(out)
    if FLEET_JSON.is_file() and FEDLORA_RUN in json.loads(FLEET_JSON.read_text())["runs"]:
        curves["fedlora"] = fedlora_curve(json.loads(FLEET_JSON.read_text()))
    result = {
        "command": "benchmarks/time_to_accuracy.py",
        "setup": {
            "base": str(BASE.relative_to(ROOT)),
            "sets": COMMON,
            "arms": ARMS,
            "seed": args.seed,
            "eval_size": 872,
            "targets": TARGETS,
            "profiles": {p: PROFILES[p].as_dict() for p in PROFILE_NAMES},
            "note": " ".join((__doc__ or "").split("\n\n")[2].split()),
        },  # fmt: skip
        "curves": curves,
        "time_to_target": {
            name: {
                f"{t:.2f}": {p: time_to(c["points"], t, p) for p in PROFILE_NAMES} for t in TARGETS
            }
            for name, c in curves.items()
        },  # fmt: skip
        "table": table(curves),
    }
    reused = reused_curves()
    if reused:
        result["reused"] = {
            "note": " ".join((reused_curves.__doc__ or "").split()),
            "targets": REUSED_TARGETS,
            "curves": reused,
            "table": table(reused, REUSED_TARGETS),
        }
    path = ROOT / "benchmarks" / "results" / "time_to_accuracy.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(curves, path.with_suffix(".png"))
    print(result["table"], flush=True)
    if reused:
        print("\n" + result["reused"]["table"], flush=True)


if __name__ == "__main__":
    main()
