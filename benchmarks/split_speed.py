"""Step time of split training against centralized training: same model, same batches.

minilm, full fine-tuning, SST-2 batches (batch 32, max 48 tokens). Three ways to take one
optimiser step on the same batch sequence, measured in interleaved rounds so that load
drift on a shared machine hits all three alike:

- `centralized`: the whole model in this process (`training.train_step`);
- `inprocess`: split at `--cut` with `--codec`, the cloud in this process behind the
  in-process transport (serialization and byte counting included);
- `grpc`: the same split with the cloud in a separate `cotune cloud` process on
  127.0.0.1, reached over gRPC.

    nice .venv/bin/python benchmarks/split_speed.py [--steps 8] [--rounds 3] [--threads 2]

Writes benchmarks/results/split_speed.json with per-step times, medians and the ratios
(targets: inprocess <= 1.10x, grpc <= 1.30x centralized).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cotune.config import Config, build_config, to_toml  # noqa: E402
from cotune.data import encode, load_task, make_loader  # noqa: E402
from cotune.link.auth import TokenBook, write_token_file  # noqa: E402
from cotune.link.service import CloudEndpoint  # noqa: E402
from cotune.methods import resolve  # noqa: E402
from cotune.methods.split import SplitCloud, SplitDevice, build_split  # noqa: E402
from cotune.models import build_classifier, load_tokenizer  # noqa: E402
from cotune.runtime.launcher import LOOPBACK, Child, cotune_command, stop_all  # noqa: E402
from cotune.runtime.split.launch import (  # noqa: E402
    STARTUP_TIMEOUT_S,
    Connect,
    grpc_connector,
    inprocess_connector,
)
from cotune.training import make_optimizer, make_schedule, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def inprocess_cloud(cfg: Config) -> Connect:
    """A `SplitCloud` in this process behind a fresh random token, reached in-process."""
    device_id = cfg.runtime.device_id
    token = secrets.token_urlsafe(24)
    endpoint = CloudEndpoint(SplitCloud(cfg), TokenBook({device_id: token}))
    return inprocess_connector(cfg, endpoint, device_id, token)


@contextmanager
def loopback_cloud(cfg: Config) -> Iterator[tuple[str, str]]:
    """A `cotune cloud` process on 127.0.0.1 (a free port) for this config, with a fresh
    token for device `runtime.device_id`; yields (address, token), stops it on exit."""
    device_id = cfg.runtime.device_id
    with tempfile.TemporaryDirectory(prefix="cotune-cloud-") as tmp:
        folder = Path(tmp)
        tokens_path = folder / "tokens"
        token = write_token_file(tokens_path, [device_id])[device_id]
        cloud_cfg = cfg.model_copy(deep=True)
        cloud_cfg.runtime.tokens = str(tokens_path)
        cloud_cfg.runtime.tls_cert = cloud_cfg.runtime.tls_key = None  # loopback: no TLS
        cfg_path = folder / "config.toml"
        cfg_path.write_text(to_toml(cloud_cfg))
        port_file = folder / "port"
        cloud = Child(
            cotune_command("cloud", "--config", str(cfg_path), "--listen", f"{LOOPBACK}:0",
                           "--port-file", str(port_file)),
            folder / "cloud.log",
        )  # fmt: skip
        try:
            wait = max(STARTUP_TIMEOUT_S, cfg.runtime.connect_timeout_s)
            port = int(cloud.wait_for_file(port_file, wait, "the loopback cloud"))
            yield f"{LOOPBACK}:{port}", token
        finally:
            stop_all([cloud], grace=60.0)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per way per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cut", type=int, default=3)
    p.add_argument("--codec", default="identity")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "SST-2"))
    p.add_argument("--out", default=str(RESULTS / "split_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    total = args.warmup + args.rounds * args.steps
    cfg = build_config(
        {
            "method": "split",
            "task": {"name": "glue/sst2", "data_dir": args.data, "max_train_examples": 2000},
            "model": {"name": "minilm"},
            "train": {
                "steps": total, "batch_size": args.batch, "max_seq_len": args.seq,
                "lr": 1e-4, "threads": args.threads,
            },
            "split": {"cut": args.cut},
            "link": {"codec": args.codec, "rank": args.rank},
            "runtime": {"connect_timeout_s": 1800},  # a busy machine starts the cloud slowly
        }
    )  # fmt: skip
    resolve(cfg)
    task = load_task(cfg.task, cfg.seed)
    tok = load_tokenizer("minilm")
    loader = make_loader(
        encode(task.train, tok, args.seq), args.batch, True, cfg.seed, tok.pad_token_id
    )
    batches = [b for _, b in zip(range(total), loader, strict=False)]
    n_labels, kind = task.num_labels, task.kind

    model, _, _ = build_classifier(cfg.model, n_labels, problem=kind, seed=cfg.seed)
    model.train()
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_schedule(opt, total, cfg.train)

    def split_device(connect: Connect) -> SplitDevice:
        split, codec = build_split(cfg, n_labels, kind)
        dev = SplitDevice(cfg, split, codec, connect(), num_labels=n_labels, problem=kind)
        dev.connect(total)
        return dev

    inproc = split_device(inprocess_cloud(cfg))
    times: dict[str, list[float]] = {"centralized": [], "inprocess": [], "grpc": []}
    with loopback_cloud(cfg) as (address, token):
        remote = split_device(grpc_connector(cfg, address, token))
        ways = {
            "centralized": lambda b: train_step(model, b, opt, sched, max_grad_norm=1.0),
            "inprocess": inproc.train_step,
            "grpc": remote.train_step,
        }
        for i in range(args.warmup):
            for fn in ways.values():
                fn(batches[i])
        step = args.warmup
        load_before = os.getloadavg()
        for r in range(args.rounds):
            for name, fn in ways.items():
                for k in range(args.steps):
                    t0 = time.perf_counter()
                    fn(batches[step + k])
                    times[name].append(time.perf_counter() - t0)
            step += args.steps
            print(
                f"round {r + 1}: "
                + ", ".join(f"{n} {statistics.median(t):.3f}s" for n, t in times.items()),
                flush=True,
            )
        load_after = os.getloadavg()
        grpc_bytes = remote.transport.meter.snapshot()
        remote.transport.close()
    med = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "setup": {
            "model": "minilm, full fine-tuning",
            "batch_size": args.batch,
            "max_seq_len": args.seq,
            "cut": args.cut,
            "codec": args.codec,
            "rank": args.rank if args.codec in ("pca", "sft") else None,
            "threads": args.threads,
            "timed_steps_per_way": args.rounds * args.steps,
            "rounds": args.rounds,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_before": load_before,
            "load_avg_after": load_after,
        },
        "median_step_s": med,
        "ratio_inprocess": med["inprocess"] / med["centralized"],
        "ratio_grpc": med["grpc"] / med["centralized"],
        "targets": {"inprocess": 1.10, "grpc": 1.30},
        "grpc_bytes": grpc_bytes,
        "step_s": times,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("median_step_s", "ratio_inprocess", "ratio_grpc")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
