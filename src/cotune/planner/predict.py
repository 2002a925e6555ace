"""Predictions for one configuration: device peak memory, bytes, time per step and epoch.

Memory (MiB): the runtime at rest + the device's weights + the optimizer state (AdamW:
8 bytes per trainable parameter; SGD: none) + `grad_scale` x gradients (4 bytes each) +
`saved_scale` x the saved activations of a batch + `overhead_mib`.

Time per step: `flops_scale` x (device FLOPs / device GFLOP/s + cloud FLOPs / cloud
GFLOP/s) + `per_mparam_s` x trainable millions + the network's time for the step's
messages (`cotune.link.network.transfer_s`, the clock model of `[link.network]`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cotune.link.accounting import DOWN, UP
from cotune.link.network import NetworkSpec, transfer_s
from cotune.planner.calibration import Calibration
from cotune.planner.facts import DeviceFacts

MIB = 2**20


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int
    """Padded length of a batch (its longest row)."""
    tokens: int
    """Real tokens in a batch."""


def peak_mib(f: DeviceFacts, batch: int, optimizer: str, cal: Calibration) -> float:
    opt = 8 * f.trainable if optimizer == "adamw" else 0
    saved = f.saved_bytes_per_example * batch
    fixed = f.weight_bytes + opt
    return (
        cal.runtime_mib
        + fixed / MIB
        + cal.grad_scale * 4 * f.trainable / MIB
        + cal.saved_scale * saved / MIB
        + cal.overhead_mib
    )


def compute_s(
    f: DeviceFacts, shape: Shape, gflops: float, cloud_gflops: float, cal: Calibration
) -> float:
    tokens = shape.batch * shape.length
    flops_s = f.device_flops.step * tokens / (gflops * 1e9) + f.cloud_flops.step * tokens / (
        cloud_gflops * 1e9
    )
    trainable_m = (f.trainable + f.cloud_trainable) / 1e6
    return cal.flops_scale * flops_s + cal.per_mparam_s * trainable_m


def network_s(spec: NetworkSpec, up: list[int], down: list[int]) -> float:
    return sum(transfer_s(spec, UP, n) for n in up) + sum(transfer_s(spec, DOWN, n) for n in down)
