"""Where the cloud side computes: `runtime.device` = "auto" | "cpu" | "cuda" | "cuda:N".

The cloud side is what runs in the data centre: centralized training, the split and
splitfed cloud segment, and the federated server's model (its evaluation, fedkd's
teacher, fedpft's proxy alignment). cotune's devices (split devices, federated
clients) always compute on the CPU: they stand for the weak machines the data lives on.

- `resolve_device` turns the setting into a `torch.device`, or says why it cannot be
  used here (no CUDA in this torch build, an index past the last GPU).
- `to_device` moves a batch to the model's device; on the CPU path it returns the very
  same tensors (no copy), so CPU runs pay nothing for it.
- `device_of` is a module's device (its first parameter's; CPU when it has none).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from cotune.errors import ConfigError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
VALID = '"auto", "cpu", "cuda" or "cuda:N"'


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str) -> torch.device:
    """The torch device for `runtime.device`; a ConfigError naming what this machine
    offers when the setting cannot be honoured."""
    spec = spec.strip().lower()
    if not re.match(DEVICE_PATTERN, spec):
        raise ConfigError(f"runtime.device = {spec!r} is not a device; valid: {VALID}")
    n_gpus = _cuda_count()
    if spec == "auto":
        return torch.device("cuda", 0) if n_gpus else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if n_gpus == 0:
        why = (
            f"this torch ({torch.__version__}) was built without CUDA"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        )
        raise ConfigError(
            f'runtime.device = {spec!r}: {why}; valid here: "cpu" or "auto" (which picks '
            "the first GPU when there is one)"
        )
    if index >= n_gpus:
        raise ConfigError(
            f"runtime.device = {spec!r}: this machine has {n_gpus} GPU(s), "
            f'valid here: "cpu", "auto", "cuda" or "cuda:0".."cuda:{n_gpus - 1}"'
        )
    return torch.device("cuda", index)


def device_of(module: nn.Module) -> torch.device:
    """The device of `module`'s first parameter (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """`batch` with its tensors on `device`; tensors already there are passed through
    unchanged (the same objects), so the CPU path copies nothing."""
    return {
        k: v.to(device, non_blocking=True)
        if isinstance(v, torch.Tensor) and v.device != device
        else v
        for k, v in batch.items()
    }


M = TypeVar("M", bound=nn.Module)


def place(module: M, device: torch.device) -> M:
    """Move `module` to `device` (in place; a no-op when it is already there)."""
    if device_of(module) != device:
        module.to(device)
    return module


def cloud_device(runtime_device: str, memory_backward: str = "none") -> torch.device:
    """The device of a cloud-side model; `memory_backward` is `memory.backward` where the
    memory option applies to that model (centralized training): its sparse modes pack
    saved activations with CPU kernels, so they need the CPU."""
    device = resolve_device(runtime_device)
    if device.type != "cpu" and memory_backward != "none":
        raise ConfigError(
            f"memory.backward = {memory_backward!r} packs saved activations with CPU kernels "
            f"(cotune's device-side memory modes); with runtime.device = {runtime_device!r} "
            'use memory.backward = "none" (memory.checkpoint = true works on a GPU), or '
            'runtime.device = "cpu"'
        )
    return device


def compute_device_summary(device: torch.device) -> dict[str, Any]:
    """What summary.json says about where the cloud side computed: the device, and on
    a GPU its name and the peak memory torch allocated there."""
    out: dict[str, Any] = {"compute_device": str(device)}
    if device.type == "cuda":
        out["cuda_name"] = torch.cuda.get_device_name(device)
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
