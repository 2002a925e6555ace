"""What `cotune plan` is asked: the device, the network, the fleet (validated)."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.config import NETWORK_PROFILES
from cotune.errors import UserError
from cotune.link.network import PROFILES, NetworkSpec


@dataclass(frozen=True)
class PlanRequest:
    """The device and the fleet a plan is for."""

    budget_mib: float
    """The device's memory budget (peak RSS of its training process), MiB."""
    gflops: float
    """The device's measured compute speed (`cotune plan --profile`), GFLOP/s."""
    cloud_gflops: float
    """The cloud's compute speed, GFLOP/s."""
    network: NetworkSpec
    devices: int = 1
    max_cost: float = 2.0
    """Accuracy cost (points) above which a configuration is ranked after the rest."""


def network_from_args(
    profile: str | None,
    up_mbps: float | None = None,
    down_mbps: float | None = None,
    latency_ms: float | None = None,
) -> NetworkSpec:
    """A named profile, overridden by explicit values; or explicit up/down (and latency)."""
    if profile is not None and profile not in PROFILES:
        raise UserError(
            f"unknown network profile {profile!r}; valid profiles: {', '.join(NETWORK_PROFILES)} "
            "(or give --up-mbps and --down-mbps, and optionally --latency-ms)"
        )
    for name, value in (("--up-mbps", up_mbps), ("--down-mbps", down_mbps)):
        if value is not None and not value > 0:
            raise UserError(f"{name} must be a positive bandwidth in Mbit/s, got {value:g}")
    if latency_ms is not None and latency_ms < 0:
        raise UserError(f"--latency-ms must be zero or positive, got {latency_ms:g}")
    if profile is None and (up_mbps is None or down_mbps is None):
        raise UserError(
            "give a network: --network PROFILE "
            f"({', '.join(NETWORK_PROFILES)}) or both --up-mbps and --down-mbps"
        )
    base = PROFILES[profile] if profile is not None else NetworkSpec(up_mbps=1.0, down_mbps=1.0)
    return NetworkSpec(
        up_mbps=up_mbps if up_mbps is not None else base.up_mbps,
        down_mbps=down_mbps if down_mbps is not None else base.down_mbps,
        latency_ms=latency_ms if latency_ms is not None else base.latency_ms,
        jitter_ms=min(base.jitter_ms, latency_ms) if latency_ms is not None else base.jitter_ms,
        loss=base.loss,
        profile=profile,
    )
