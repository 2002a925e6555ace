"""Accuracy against bytes on the wire for split fine-tuning on SST-2 (minilm).

Sweeps the cut (2, 3, 4) and the link codec (identity, int8, pca r=16, sft r=8 and r=32
with the code in fp32 or int8), plus the centralized baseline, all with one budget (full
fine-tuning, the same steps, batch, sequence length, LR and seed). Each run is a `cotune run` process writing
its own run folder under the output folder; several run at once (`--workers`).

    nice .venv/bin/python benchmarks/split_sweep.py [--steps 80] [--batch 16] [--workers 4]
    .venv/bin/python benchmarks/split_sweep.py --aggregate   # table + plot from finished runs

Writes `<out>/split_sweep.json` and `<out>/split_sweep.png` (default out:
benchmarks/results/split_sweep). Bytes are what the transport counted (training and
evaluation traffic, both directions); `train_bytes` is the training phase alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "split_sweep"
CODECS: dict[str, dict[str, Any]] = {
    "identity": {"codec": "identity"},
    "int8": {"codec": "int8"},
    "pca16": {"codec": "pca", "rank": 16},
    "sft8": {"codec": "sft", "rank": 8},
    "sft32": {"codec": "sft", "rank": 32},
    # the r-dim code and its gradient as int8 (+ a float32 scale per token row)
    "sft8-int8": {"codec": "sft", "rank": 8, "code_format": "int8"},
    "sft32-int8": {"codec": "sft", "rank": 32, "code_format": "int8"},
}
CUTS = (2, 3, 4)


def runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run of the sweep; the headline ones (centralized, cut 3 identity/sft8) first."""
    out = [{"name": "centralized", "method": "centralized", "sets": []}]
    order = [(3, "identity"), (3, "sft8")] + [
        (cut, codec)
        for cut in CUTS
        for codec in CODECS
        if (cut, codec) not in {(3, "identity"), (3, "sft8")}
    ]
    for cut, codec in order:
        sets = [f"split.cut={cut}"] + [
            f"link.{k}={json.dumps(v)}" for k, v in CODECS[codec].items()
        ]
        out.append(
            {
                "name": f"cut{cut}-{codec}",
                "method": "split",
                "cut": cut,
                "codec": codec,
                "sets": sets,
            }
        )
    return out


def base_sets(args: argparse.Namespace) -> list[str]:
    return [
        'task.name="glue/sst2"',
        f"task.data_dir={json.dumps(str(Path(args.data).resolve()))}",
        'model.name="minilm"',
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.max_seq_len={args.seq}",
        f"train.lr={args.lr}",
        f"train.threads={args.threads}",
        f"seed={args.seed}",
        f"task.max_train_examples={args.train_examples}",
    ]


def run_one(run: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    folder = out / run["name"]
    if (folder / "summary.json").is_file() and not args.force:
        return run
    cmd = [
        sys.executable, "-m", "cotune", "run", "--out", str(folder),
        "--set", f'method="{run["method"]}"', "--set", f'name="{run["name"]}"',
    ]  # fmt: skip
    for s in base_sets(args) + run["sets"]:
        cmd += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    log = out / f"{run['name']}.log"
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    for weights in folder.glob("*.safetensors"):  # trained weights (up to 90 MB): not results
        weights.unlink()
    print(f"{run['name']}: exit {code} after {time.time() - t0:.0f} s", flush=True)
    return run


def collect(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    rows = []
    for run in runs(args):
        path = out / run["name"] / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        link = s.get("link", {})
        train = link.get("by_phase", {}).get("train", {"up": 0, "down": 0})
        rows.append(
            {
                "name": run["name"],
                "method": run["method"],
                "cut": run.get("cut"),
                "codec": run.get("codec"),
                "accuracy": s["metrics"].get("accuracy"),
                "bytes_up": s["comm"]["bytes_up"],
                "bytes_down": s["comm"]["bytes_down"],
                "bytes": s["comm"]["bytes_up"] + s["comm"]["bytes_down"],
                "train_bytes": train["up"] + train["down"],
                "width": link.get("width"),
                "wall_s": s["wall_s"],
                "step_s_median": s.get("step_s_median"),
                "trainable_device": s["trainable_params"]["device"],
                "trainable_cloud": s["trainable_params"]["cloud"],
            }
        )
    by = {r["name"]: r for r in rows}
    headline: dict[str, Any] = {}
    if "cut3-identity" in by and "cut3-sft8" in by:
        headline["bytes_ratio_identity_over_sft8_cut3"] = (
            by["cut3-identity"]["bytes"] / by["cut3-sft8"]["bytes"]
        )
        headline["train_bytes_ratio_identity_over_sft8_cut3"] = (
            by["cut3-identity"]["train_bytes"] / by["cut3-sft8"]["train_bytes"]
        )
    if "centralized" in by and "cut3-sft8" in by:
        headline["accuracy_points_sft8_cut3_minus_centralized"] = 100 * (
            by["cut3-sft8"]["accuracy"] - by["centralized"]["accuracy"]
        )
    if headline:
        headline["target_met"] = {
            "bytes_40x": headline.get("bytes_ratio_identity_over_sft8_cut3", 0) >= 40,
            "within_1.5_points": abs(
                min(0.0, headline.get("accuracy_points_sft8_cut3_minus_centralized", -99))
            )
            <= 1.5,
        }
    return {
        "budget": {
            "task": "glue/sst2 (train: seeded subsample of the 67,349 phrases; eval: the 872-sentence dev set)",
            "train_examples": args.train_examples,
            "model": "minilm (all-MiniLM-L6-v2), full fine-tuning",
            "steps": args.steps,
            "batch_size": args.batch,
            "max_seq_len": args.seq,
            "lr": args.lr,
            "seed": args.seed,
            "threads_per_run": args.threads,
            "parallel_runs": args.workers,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg": os.getloadavg(),
        },
        "headline": headline,
        "runs": rows,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"identity": "o", "int8": "s", "pca16": "^", "sft8": "D", "sft32": "P",
               "sft8-int8": "d", "sft32-int8": "X"}  # fmt: skip
    colors = {2: "tab:blue", 3: "tab:orange", 4: "tab:green"}
    for r in result["runs"]:
        if r["method"] == "centralized":
            ax.axhline(
                r["accuracy"],
                color="gray",
                ls="--",
                lw=1,
                label=f"centralized ({r['accuracy']:.3f})",
            )
            continue
        ax.scatter(
            r["bytes"], r["accuracy"], marker=markers[r["codec"]], color=colors[r["cut"]], s=50
        )
    for codec, m in markers.items():
        ax.scatter([], [], marker=m, color="k", label=codec)
    for cut, c in colors.items():
        ax.scatter([], [], marker="o", color=c, label=f"cut {cut}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bytes on the wire (up + down, training and evaluation)")
    ax.set_ylabel("SST-2 dev accuracy")
    b = result["budget"]
    ax.set_title(f"split minilm on SST-2: {b['steps']} steps x batch {b['batch_size']}")
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--workers", type=int, default=4, help="runs at once")
    p.add_argument(
        "--train-examples", type=int, default=8000, help="seeded subsample of the 67,349"
    )
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "SST-2"))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--only", nargs="*", help="run only these names (e.g. centralized cut3-sft8)")
    p.add_argument("--force", action="store_true", help="re-run finished runs")
    p.add_argument("--aggregate", action="store_true", help="only collect finished runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.aggregate:
        todo = [r for r in runs(args) if not args.only or r["name"] in args.only]
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            list(pool.map(lambda r: run_one(r, args, out), todo))
    result = collect(args, out)
    (out / "split_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "split_sweep.png")
    for r in result["runs"]:
        print(
            f"{r['name']:>16}  acc {r['accuracy']:.4f}  bytes {r['bytes']:>14,}  train {r['train_bytes']:>14,}"
        )
    print(json.dumps(result["headline"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
