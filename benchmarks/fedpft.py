"""FedPFT on SST-2: fedpft vs an offsite-tuning-style layer-drop proxy vs fedlora on
the full model (FM), iid and Dirichlet(1), plus the alignment ablation.

Every run: 100 clients, 10 sampled per round, LoRA r8 (alpha 16) on Q, K, V and the
attention output plus the head, the same local steps, batch, learning rate and rounds
for every method (see BUDGET). The score is always the FM's: the aggregated adapter and
head are plugged into all-MiniLM-L6-v2 and evaluated on the 872-sentence dev set after
every round. Bytes are the serialised Flower messages (both directions, proxy downloads
included). Client compute is measured around every ClientApp call: wall seconds and
CPU seconds of the thread that ran it.

Runs use the inline engine (the same ServerApp and ClientApp, clients called one at a
time in this process): on a 2-core shared machine Ray only adds overhead.

    nice .venv/bin/python benchmarks/fedpft.py --runs fedpft-iid layer_drop-iid ...
    .venv/bin/python benchmarks/fedpft.py --table     # collect results, print Markdown

One JSON per run in benchmarks/results/fedpft/, the collection in
benchmarks/results/fedpft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fedpft"
os.environ.setdefault("COTUNE_PROXY_CACHE", str(ROOT / "runs" / "bench-fedpft" / "proxy-cache"))

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp.typing import ClientAppCallable  # noqa: E402

from cotune.config import build_config  # noqa: E402
from cotune.methods import resolve  # noqa: E402
from cotune.report.run_folder import read_jsonl  # noqa: E402
from cotune.runtime.federated.apps import build_client_app  # noqa: E402
from cotune.runtime.federated.engine import run_federated  # noqa: E402

ATTENTION = ["query", "key", "value", "attention.output.dense"]
BUDGET: dict[str, Any] = {
    "seed": 0,
    "task": {
        "name": "glue/sst2",
        "data_dir": str(ROOT.parent / "shared" / "data" / "glue" / "SST-2"),
        "max_train_examples": 20000,  # seeded subsample, 200 phrases per client on average
        "max_eval_examples": 872,
    },
    "model": {
        "name": "minilm",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ATTENTION},
    },
    "train": {"batch_size": 8, "max_seq_len": 64, "lr": 5e-3, "threads": 1},
    "federated": {"clients": 100, "fraction": 0.1, "rounds": 8, "local_steps": 10},
    "proxy": {
        "keep_layers": [0, 5],
        "ffn_keep": 384,
        "align_steps": 100,  # layer-level, before FL (batch 8, bbc-news text, 64 tokens)
        "realign_steps": 15,  # neuron-level, every align_every rounds
        "align_every": 2,
        "align_keep": 0.5,
        "align_lr": 3e-4,
        "public_corpus": "bbc-news",
    },
    "runtime": {"checkpoint": False},
}
PARTITIONS = {"iid": {"partition": "iid"}, "dir1": {"partition": "dirichlet", "alpha": 1.0}}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedpft": ("fedpft", {"kind": "neuron"}),
    "layer_drop": ("fedpft", {"kind": "layer_drop"}),
    "fedlora": ("fedlora", {}),
    "fedpft_noalign": ("fedpft", {"kind": "neuron", "align_steps": 0, "realign_steps": 0}),
    "fedpft_prealign": ("fedpft", {"kind": "neuron", "realign_steps": 0}),
}


def config_for(run: str) -> Any:
    variant, part = run.rsplit("-", 1)
    method, proxy = VARIANTS[variant]
    data = json.loads(json.dumps(BUDGET))
    data["name"] = f"bench-fedpft-{run}"
    data["method"] = method
    data["federated"].update(PARTITIONS[part])
    if method == "fedpft":
        data["proxy"].update(proxy)
    else:
        del data["proxy"]
    return resolve(build_config(data))


class ClientClock:
    """A Flower mod timing every ClientApp call (wall and the calling thread's CPU)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        w0, c0 = time.perf_counter(), time.thread_time()
        reply = call_next(msg, ctx)
        if msg.metadata.message_type == "train":
            self.wall.append(time.perf_counter() - w0)
            self.cpu.append(time.thread_time() - c0)
        return reply


def run_one(run: str, out_root: Path) -> dict[str, Any]:
    cfg = config_for(run)
    run_dir = out_root / run
    shutil.rmtree(run_dir, ignore_errors=True)
    clock = ClientClock()
    t0 = time.perf_counter()
    result = run_federated(cfg, run_dir, engine="inline", client_app=build_client_app([clock]))
    wall = time.perf_counter() - t0
    rounds = read_jsonl(run_dir / "metrics.jsonl")
    last = rounds[-1]
    out: dict[str, Any] = {
        "run": run,
        "method": cfg.method,
        "proxy_kind": cfg.proxy.kind if cfg.method == "fedpft" else None,
        "partition": cfg.federated.partition,
        "accuracy": last["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "bytes_per_round": (last["bytes_up"] + last["bytes_down"]) / len(rounds),
        "bytes_up_per_round": last["bytes_up"] / len(rounds),
        "bytes_down_per_round": last["bytes_down"] / len(rounds),
        "round_bytes_down": [r["round_bytes_down"] for r in rounds],
        "round_bytes_up": [r["round_bytes_up"] for r in rounds],
        "client_rounds": len(clock.wall),
        "client_wall_s_mean": statistics.mean(clock.wall) if clock.wall else None,
        "client_cpu_s_mean": statistics.mean(clock.cpu) if clock.cpu else None,
        "client_peak_rss_bytes": result.device_peak_bytes,
        "trainable_device": result.trainable_device,
        "trainable_cloud": result.trainable_cloud,
        "wall_s": wall,
        "per_round": rounds,
        "config": cfg.model_dump(mode="json"),
    }
    first = rounds[0]
    for key in ("proxy_non_embedding_params", "fm_non_embedding_params", "proxy_params",
                "fm_params", "proxy_gap_before", "proxy_gap_after"):  # fmt: skip
        if key in first:
            out[key] = first[key]
    out["proxy_gaps"] = {
        k: v for k, v in first.items() if k.startswith(("proxy_gap_before_l", "proxy_gap_after_l"))
    }
    realign = [r for r in rounds if "realign_gap_before" in r]
    out["realign"] = [
        {k: r[k] for k in r if k.startswith("realign_") or k == "round"} for r in realign
    ]
    return out


def collect() -> dict[str, Any]:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    data = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "budget": BUDGET,
        "runs": runs,
    }
    (RESULTS.parent / "fedpft.json").write_text(json.dumps(data, indent=1) + "\n")
    return data


def table(data: dict[str, Any]) -> str:
    runs = data["runs"]
    head = (
        "| run | method | partition | FM accuracy (plugged) | per round | bytes/round (MB) "
        "| down / up (MB) | client s/round (wall, cpu) | device params (non-emb.) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, r in runs.items():
        params = r.get("proxy_non_embedding_params") or r.get("fm_non_embedding_params")
        lines.append(
            f"| {name} | {r['method']}{'/' + r['proxy_kind'] if r['proxy_kind'] else ''} "
            f"| {r['partition']} | {r['accuracy']:.4f} "
            f"| {' '.join(f'{a:.3f}' for a in r['accuracy_per_round'])} "
            f"| {r['bytes_per_round'] / 1e6:.2f} "
            f"| {r['bytes_down_per_round'] / 1e6:.2f} / {r['bytes_up_per_round'] / 1e6:.2f} "
            f"| {r['client_wall_s_mean']:.1f}, {r['client_cpu_s_mean']:.1f} "
            f"| {int(params) if params else 'FM'} |"
        )
    return head + "\n".join(lines) + "\n"


def proxy_only(steps: int) -> dict[str, Any]:
    """Done-when (1) alone: build the minilm proxy (keep layers {0, 5}, 384 neurons
    elsewhere), measure its per-layer gap to the FM on held-out bbc-news text, align
    it layer by layer for `steps` steps, measure again."""
    from cotune.data import encode
    from cotune.methods.federated.client import client_adapter
    from cotune.methods.fedpft.alignment import align, layer_gaps
    from cotune.methods.fedpft.cloud import GAP_BATCHES, _batches, public_examples
    from cotune.models.proxy import build_proxy, ffn_param_names, non_embedding_params
    from cotune.training import derive_seed, seed_everything

    cfg = config_for("fedpft-iid")
    torch_threads = cfg.train.threads
    import torch

    torch.set_num_threads(torch_threads or 1)
    seed_everything(derive_seed(cfg.seed, "global-init"))
    fm, tok = client_adapter(cfg).build_model()
    proxy, plan, _ = build_proxy(fm, cfg.proxy)
    text, held_out = public_examples(cfg)
    held = _batches(encode(held_out, tok, cfg.train.max_seq_len), tok, cfg, 1)
    gap_batches = [next(held) for _ in range(GAP_BATCHES)]
    t0 = time.perf_counter()
    before = layer_gaps(proxy, fm, plan, gap_batches)
    print("gap before", [round(g, 4) for g in before], flush=True)
    train = _batches(encode(text, tok, cfg.train.max_seq_len), tok, cfg, 2)
    stats = align(proxy, fm, plan, train, steps, cfg.proxy.align_lr,
                  params=ffn_param_names(proxy, plan))  # fmt: skip
    after = layer_gaps(proxy, fm, plan, gap_batches)
    print("gap after", [round(g, 4) for g in after], flush=True)
    return {
        "model": cfg.model.name,
        "plan": {"layers": list(plan.layer_map), "ffn": list(plan.ffn_keep)},
        "fm_non_embedding_params": non_embedding_params(fm),
        "proxy_non_embedding_params": non_embedding_params(proxy),
        "reduction": 1 - non_embedding_params(proxy) / non_embedding_params(fm),
        "public_corpus": cfg.proxy.public_corpus,
        "align": {
            "steps": stats.steps,
            "batch_size": cfg.train.batch_size,
            "max_seq_len": cfg.train.max_seq_len,
            "lr": cfg.proxy.align_lr,
            "first_loss": stats.first_loss,
            "last_loss": stats.last_loss,
        },  # fmt: skip
        "held_out_tokens_batches": GAP_BATCHES,
        "gap_before": before,
        "gap_after": after,
        "gap_before_mean": sum(before) / len(before),
        "gap_after_mean": sum(after) / len(after),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="*", default=[], help="e.g. fedpft-iid layer_drop-dir1")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-fedpft"))
    parser.add_argument("--proxy-only", type=int, metavar="STEPS", default=0,
                        help="only build and align the minilm proxy for STEPS steps")  # fmt: skip
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.proxy_only:
        res = proxy_only(args.proxy_only)
        path = RESULTS.parent / "fedpft-proxy.json"
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: v for k, v in res.items() if "gap" in k or k == "reduction"}))
        return
    for run in args.runs:
        config_for(run)  # fail early on a bad name
    for run in args.runs:
        print(f"== {run}", flush=True)
        res = run_one(run, Path(args.out))
        (RESULTS / f"{run}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(
            f"{run}: accuracy {res['accuracy']:.4f} per round {res['accuracy_per_round']} "
            f"bytes/round {res['bytes_per_round']:.0f} client s {res['client_wall_s_mean']:.1f} "
            f"wall {res['wall_s']:.0f}s",
            flush=True,
        )
    if args.table or not args.runs:
        print(table(collect()))


if __name__ == "__main__":
    main()
