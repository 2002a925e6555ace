"""`splitfed`: split-federated LoRA (SplitLoRA, METHODS.md section 2).

`federated.clients` devices each run the embeddings and layers `< split.cut` with LoRA
and train CONCURRENTLY against one cloud, which runs the rest with LoRA, the LM head and
the loss (completion tokens only, label smoothing). Per step a device sends the real
tokens' activations (dynamic padding; any `link.codec`), the next-token labels and
the mask; the cloud returns the activations' gradient and steps; the device steps its
own optimiser on the same LR schedule. Every `federated.aggregate_every` steps (and
after the last) the device adapters are averaged on the cloud, weighted by local data
size, and sent back (counted bytes). `split.server`: `shared` (one cloud model for all)
or `per_client` (one copy per device, averaged with the adapters); see
docs/splitfed.md.

`runtime.transport`:
- `inprocess`: one thread per device in this process, each with its own in-process
  transport to the cloud endpoint (same serialization and byte accounting as gRPC);
- `grpc` with `runtime.cloud` unset: a `cotune cloud` process and one `cotune device`
  process per device on loopback;
- `grpc` with `runtime.cloud = "host:port"`: this process is device
  `runtime.device_id` of that cloud (what `cotune device` runs).

The result is evaluated on the merged model (device adapters + cloud adapters loaded
into the uncut model) by beam search and the task's metrics.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from cotune.config import Config
from cotune.errors import ConfigError
from cotune.link.auth import TokenBook
from cotune.link.service import CloudEndpoint
from cotune.link.transport import InProcessTransport
from cotune.methods.result import MethodResult, Recorder
from cotune.methods.splitfed.cloud import Aggregator, LMCloud, SplitFedCloud, build_lm_split
from cotune.methods.splitfed.device import DeviceReport, LMDevice, run_device

__all__ = [
    "Aggregator",
    "DeviceReport",
    "LMCloud",
    "LMDevice",
    "SplitFedCloud",
    "build_lm_split",
    "merged_model",
    "run",
    "run_device",
    "simulate",
]


def check_config(cfg: Config) -> None:
    from cotune.data import canonical_name

    if cfg.split.labels != "cloud":
        raise ConfigError(
            "splitfed keeps the LM head and the loss on the cloud: split.labels must be 'cloud'"
        )
    if cfg.model.lora is None:
        raise ConfigError("splitfed trains LoRA adapters: give model.lora (e.g. { r = 4 })")
    if canonical_name(cfg.task.name) != "e2e":
        raise ConfigError(
            f"splitfed fine-tunes causal LMs on generation tasks (task.name = 'e2e'), "
            f"not {cfg.task.name!r}"
        )


def merged_model(cfg: Config, device_state: dict[str, Any], cloud_state: dict[str, Any]) -> Any:
    """The uncut model with the device and cloud trainable tensors loaded."""
    from cotune.methods.lm import build_lm
    from cotune.models import load_adapter_state_dict

    if cfg.link.codec == "sft":
        raise ConfigError(
            "link.codec = 'sft' factorises the cut layer, which the uncut model lacks: "
            "its merged model cannot be evaluated; use another codec for splitfed"
        )
    model, tokenizer, _ = build_lm(cfg)
    load_adapter_state_dict(model, {**device_state, **cloud_state})
    return model, tokenizer


def evaluate_merged(
    cfg: Config, device_state: dict[str, Any], cloud_state: dict[str, Any], run_dir: Any
) -> dict[str, float]:
    from cotune.methods.federated.data import task_for
    from cotune.methods.lm import evaluate_generation, write_outputs

    model, tokenizer = merged_model(cfg, device_state, cloud_state)
    task = task_for(cfg)
    metrics, texts = evaluate_generation(model.lm, tokenizer, task, cfg)
    if run_dir is not None:
        write_outputs(run_dir, task, texts)
    return metrics


def simulate(cfg: Config, *, on_step: Any = None) -> tuple[SplitFedCloud, dict[int, Any]]:
    """Train all devices concurrently (one thread each) against an in-process cloud.

    Returns the cloud and, per device, its `DeviceReport` or the exception it raised.
    """
    check_config(cfg)
    cloud = SplitFedCloud(cfg)
    tokens = {i: secrets.token_urlsafe(16) for i in range(cfg.federated.clients)}
    endpoint = CloudEndpoint(cloud, TokenBook(tokens))
    max_bytes = int(cfg.runtime.max_message_mb * 1024 * 1024)
    results: dict[int, Any] = {}

    def work(i: int) -> None:
        def connect() -> InProcessTransport:
            return InProcessTransport(endpoint, i, tokens[i], max_message_bytes=max_bytes)

        try:
            results[i] = run_device(cfg, i, connect, on_step=on_step)
        except BaseException as err:  # reported to the caller
            results[i] = err

    # Build (and cache) the task and its partition once before the threads start.
    from cotune.methods.federated.data import split_for, task_for

    task_for(cfg)
    split_for(cfg)
    threads = [threading.Thread(target=work, args=(i,), name=f"device-{i}") for i in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return cloud, results


def _result(
    cfg: Config,
    reports: list[DeviceReport],
    cloud_trainable: int,
    metrics: dict[str, float],
    extra: dict[str, Any],
) -> MethodResult:
    up = sum(int(r.meter["bytes_up"]) for r in reports)
    down = sum(int(r.meter["bytes_down"]) for r in reports)
    losses = [x for r in reports for x in r.losses[-10:]]
    return MethodResult(
        metrics=metrics,
        bytes_up=up,
        bytes_down=down,
        device_peak_bytes=max((r.peak_rss_bytes for r in reports), default=0),
        saved_activation_bytes=max((r.saved_activation_bytes for r in reports), default=0),
        trainable_device=reports[0].trainable if reports else 0,
        trainable_cloud=cloud_trainable,
        extra={
            "server": cfg.split.server,
            "devices": [
                {
                    "device": r.device_id,
                    "examples": r.examples,
                    "steps": r.steps,
                    "train_s": r.train_s,
                    "bytes_up": r.meter.get("bytes_up"),
                    "bytes_down": r.meter.get("bytes_down"),
                    "by_phase": r.meter.get("by_phase"),
                    "rounds": len(r.rounds),
                    "reconnects": r.reconnects,
                    "peak_rss_bytes": r.peak_rss_bytes,
                }
                for r in reports
            ],  # fmt: skip
            "final_train_loss": sum(losses) / max(len(losses), 1),
            **extra,
        },
    )


def run(cfg: Config, recorder: Recorder, run_dir: Path | None = None) -> MethodResult:
    check_config(cfg)
    if cfg.runtime.transport == "grpc":
        from cotune.methods.splitfed import launch

        if cfg.runtime.cloud is not None:
            return launch.run_grpc_device(cfg, recorder, run_dir)
        return launch.run_loopback(cfg, recorder, run_dir)
    t0 = time.perf_counter()

    def on_step(device_id: int, step: int, loss: float) -> None:
        if step % 10 == 0:
            recorder.log_train({"step": step, "device": device_id, "loss": loss})

    cloud, results = simulate(cfg, on_step=on_step)
    failed = {i: r for i, r in results.items() if isinstance(r, BaseException)}
    if failed:
        first = failed[min(failed)]
        raise RuntimeError(f"splitfed: device(s) {sorted(failed)} failed: {first!r}") from first
    reports = [results[i] for i in sorted(results)]
    train_wall = time.perf_counter() - t0
    cloud_state = cloud.trainable_state()
    if run_dir is not None:
        save_file({n: t.contiguous() for n, t in reports[0].state.items()},
                  str(Path(run_dir) / "device_trainable.safetensors"))  # fmt: skip
        save_file({n: t.contiguous() for n, t in cloud_state.items()},
                  str(Path(run_dir) / "cloud_trainable.safetensors"))  # fmt: skip
    metrics = evaluate_merged(cfg, reports[0].state, cloud_state, run_dir)
    result = _result(
        cfg, reports, cloud.trainable_count(), metrics,
        {"train_wall_s": train_wall, "rounds": cloud.aggregator.rounds[-1:]},
    )  # fmt: skip
    recorder.log_eval(
        {"step": max(r.steps for r in reports), **metrics, "bytes_up": result.bytes_up,
         "bytes_down": result.bytes_down, "wall_s": time.perf_counter() - t0}
    )  # fmt: skip
    return result
