"""`splitfed`: split-federated LoRA (SplitLoRA).

`federated.clients` devices each run the embeddings and layers `< split.cut` with LoRA
and train CONCURRENTLY against one cloud, which runs the rest with LoRA, the LM head and
the loss (completion tokens only, label smoothing). Per step a device sends the real
tokens' activations (dynamic padding; any `link.codec` but `sft`), the next-token
labels and the mask; the cloud returns the activations' gradient and steps; the device
steps its own optimiser on the same LR schedule. Every `federated.aggregate_every`
steps (and after the last) the device adapters are averaged on the cloud, weighted by
local data size, and sent back (counted bytes). `split.server`: `shared` (one cloud
model for all, SplitFed V2) or `per_client` (one copy per device, averaged with the
adapters, SplitFed V1).

Read in this order: `device.py` (one device: `LMDevice`, `train_device`), `cloud.py`
(`SplitFedCloud`: the cloud copies and the averaging barrier), then `finish` below:
the run is scored on the merged model (device adapters + cloud adapters loaded into the
uncut model) by beam search and the task's metrics.

The runtime runs the devices as threads against an in-process cloud, as processes
against a `cotune cloud` on loopback, or this process as one device of a remote cloud.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotune.config import Config
from cotune.data.registry import task_kind
from cotune.errors import ConfigError
from cotune.methods.federated.data import server_task
from cotune.methods.spec import (
    CloudOutcome,
    DeviceOutcome,
    MethodResult,
    MethodSpec,
    SplitSpec,
    require_model_family,
)
from cotune.methods.splitfed.cloud import Aggregator, LMCloud, SplitFedCloud, build_lm_split
from cotune.methods.splitfed.device import LMDevice, train_device
from cotune.models import load_adapter_state_dict
from cotune.models.cut_lm import LM_CUT_FAMILIES
from cotune.training import Recorder, adapter_for


def configure(cfg: Config) -> None:
    if cfg.split.labels != "cloud":
        raise ConfigError(
            "splitfed keeps the LM head and the loss on the cloud: split.labels must be 'cloud'"
        )
    if cfg.model.lora is None:
        raise ConfigError("splitfed trains LoRA adapters: give model.lora (e.g. { r = 4 })")
    kind = task_kind(cfg.task.name, cfg.task)
    if kind != "generation":
        raise ConfigError(
            f"splitfed fine-tunes causal LMs on generation tasks (e.g. task.name = 'e2e'), "
            f"not {cfg.task.name!r} (a {kind} task)"
        )
    require_model_family(
        cfg, LM_CUT_FAMILIES, "splitfed (cutting the model between devices and cloud)"
    )
    if cfg.federated.client_data == "node" and cfg.train.steps is None:
        raise ConfigError(
            "splitfed devices with their own data (--data, federated.client_data = 'node') "
            "hold different amounts of it, but average their adapters in lockstep: set "
            "train.steps, the same on every device"
        )
    if cfg.link.codec == "sft":
        raise ConfigError(
            "link.codec = 'sft' factorises the cut layer, which the uncut model lacks: "
            "its merged model cannot be evaluated; use another codec for splitfed"
        )


def merged_model(cfg: Config, device_state: dict[str, Any], cloud_state: dict[str, Any]) -> Any:
    """(model, tokenizer): the uncut model with the device and cloud tensors loaded."""
    model, tokenizer = adapter_for(server_task(cfg), cfg).build_model()
    load_adapter_state_dict(model, {**device_state, **cloud_state})
    return model, tokenizer


def finish(
    cfg: Config,
    cloud: CloudOutcome,
    devices: list[DeviceOutcome],
    recorder: Recorder,
    run_dir: Path | None,
) -> MethodResult:
    """Score the merged model (the lowest finished device's adapter: after the last
    averaging round all devices hold the same one) and sum the devices' traffic."""
    adapter = adapter_for(server_task(cfg), cfg)
    model, tokenizer = merged_model(cfg, devices[0].state, cloud.state)
    evaluation = adapter.evaluate(model, tokenizer)
    if run_dir is not None:
        adapter.save_outputs(run_dir, evaluation)
    results = [d.result for d in devices]
    losses = [x for r in results for x in r.extra.get("recent_losses", [])]
    return MethodResult(
        metrics=evaluation.metrics,
        bytes_up=sum(r.bytes_up for r in results),
        bytes_down=sum(r.bytes_down for r in results),
        device_peak_bytes=max((r.device_peak_bytes or 0 for r in results), default=0),
        saved_activation_bytes=max((r.saved_activation_bytes or 0 for r in results), default=0),
        trainable_device=results[0].trainable_device,
        trainable_cloud=cloud.trainable,
        extra={
            "device_weight_bytes": results[0].extra.get("device_weight_bytes"),
            "server": cfg.split.server,
            "cloud_steps": cloud.steps,
            "final_train_loss": sum(losses) / max(len(losses), 1),
            "devices": [
                {
                    "device": d.device_id,
                    "examples": d.result.extra.get("examples"),
                    "train_sha256": d.result.extra.get("train_sha256"),
                    "steps": d.result.extra.get("steps"),
                    "rounds": d.result.extra.get("rounds"),
                    "train_s": d.result.extra.get("train_s"),
                    "memory_breakdown": d.result.extra.get("memory_breakdown"),
                    "reconnects": d.result.extra.get("reconnects"),
                    "peak_rss_bytes": d.result.device_peak_bytes,
                    "bytes_up": d.result.bytes_up,
                    "bytes_down": d.result.bytes_down,
                    "by_phase": d.result.extra.get("meter", {}).get("by_phase"),
                }
                for d in devices
            ],
        },
        saved={
            "device_trainable.safetensors": devices[0].state,
            "cloud_trainable.safetensors": cloud.state,
        },  # fmt: skip
        predictions=evaluation.predictions,
    )


SPEC = MethodSpec(
    name="splitfed",
    summary="many devices split-train concurrently against one cloud; adapters averaged",
    runs=SplitSpec(
        cloud=SplitFedCloud,
        device=train_device,
        devices=lambda cfg: cfg.federated.clients,
        finish=finish,
    ),
    reads=frozenset({"generation", "split", "link", "federated", "memory", "runtime", "privacy"}),
    configure=configure,
)

__all__ = [
    "SPEC",
    "Aggregator",
    "LMCloud",
    "LMDevice",
    "SplitFedCloud",
    "build_lm_split",
    "finish",
    "merged_model",
    "train_device",
]
