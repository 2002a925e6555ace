"""Emulated networks: the named profiles, the transfer-time model, and the simulated clock.

A link between a device and the cloud has an uplink rate (device -> cloud), a downlink
rate, a one-way propagation delay (`latency`), a jitter (the delay is uniform in
latency +- jitter) and a packet loss probability. One message of `n` bytes (the bytes
`ByteMeter` counts for it: the serialized message plus gRPC's 5-byte prefix) costs

    t(n) = s + latency + r(n),      s = 8 n / rate            (serialization)
    r(n) = s * p / (1 - p)                                     (lost packets sent again)
         + (1 - (1 - p)^k) * 2 * latency                       (one round trip to recover)

where p is the loss probability and k = ceil(n / MSS) the TCP segments of the message
(MSS = 1448 bytes): each segment is lost independently; the lost ones are sent again
(on average p / (1 - p) extra sends per segment), and a message that lost any segment
waits one round trip for the loss to be noticed (fast retransmit). The clock uses the
expected value (jitter has zero mean); `cotune.link.pacing` draws jitter and loss.

Only message bytes are modelled: HTTP/2 frames, TCP/IP headers and acknowledgements are
not (see `cotune.link.accounting`), nor TCP's congestion window.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

from cotune.config import NETWORK_PROFILES, NetworkConfig
from cotune.errors import ConfigError
from cotune.link.accounting import DOWN, UP

MSS_BYTES = 1448  # TCP payload of one 1500-byte Ethernet frame (with TCP timestamps)


@dataclass(frozen=True)
class NetworkSpec:
    """One emulated link. Rates in Mbit/s (10^6 bit/s), delays in ms, loss in [0, 1)."""

    up_mbps: float
    down_mbps: float
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    mode: str = "clock"
    profile: str | None = None

    def rate_bytes_per_s(self, direction: str) -> float:
        """The rate of `direction` ("up" or "down") in bytes per second."""
        if direction == UP:
            return self.up_mbps * 1e6 / 8
        if direction == DOWN:
            return self.down_mbps * 1e6 / 8
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# The named profiles (README "Emulated networks" lists the same values).
PROFILES: dict[str, NetworkSpec] = {
    "datacenter": NetworkSpec(up_mbps=10_000, down_mbps=10_000, latency_ms=0.1),
    "wifi": NetworkSpec(up_mbps=50, down_mbps=100, latency_ms=5, jitter_ms=1),
    "lte": NetworkSpec(up_mbps=10, down_mbps=40, latency_ms=25, jitter_ms=5),
    "constrained": NetworkSpec(up_mbps=1, down_mbps=2, latency_ms=100, jitter_ms=20, loss=0.01),
}
assert tuple(PROFILES) == NETWORK_PROFILES, "config.NETWORK_PROFILES must list PROFILES"


def network_spec(cfg: NetworkConfig) -> NetworkSpec:
    """The link `[link.network]` describes: its profile's values, overridden by the
    fields the config gives explicitly."""
    base = PROFILES[cfg.profile] if cfg.profile is not None else None
    values: dict[str, Any] = (
        {k: v for k, v in base.as_dict().items() if k not in ("mode", "profile")} if base else {}
    )
    for key in ("up_mbps", "down_mbps", "latency_ms", "jitter_ms", "loss"):
        given = getattr(cfg, key)
        if given is not None:
            values[key] = float(given)
    spec = NetworkSpec(**values, mode=cfg.mode, profile=cfg.profile)
    if spec.jitter_ms > spec.latency_ms:
        raise ConfigError(
            f"link.network: jitter_ms ({spec.jitter_ms:g}) exceeds latency_ms "
            f"({spec.latency_ms:g}); the delay is latency +- jitter, so give jitter_ms <= "
            "latency_ms"
        )
    return spec


def serialization_s(n_bytes: int, rate_bytes_per_s: float) -> float:
    return n_bytes / rate_bytes_per_s


def retransmission_s(n_bytes: int, serialization: float, latency_s: float, loss: float) -> float:
    """The expected time lost packets add to a message (the model in the module doc)."""
    if loss <= 0 or n_bytes <= 0:
        return 0.0
    segments = math.ceil(n_bytes / MSS_BYTES)
    return serialization * loss / (1 - loss) + (1 - (1 - loss) ** segments) * 2 * latency_s


def transfer_s(spec: NetworkSpec, direction: str, n_bytes: int) -> float:
    """The expected time for one message of `n_bytes` to cross in `direction`."""
    s = serialization_s(n_bytes, spec.rate_bytes_per_s(direction))
    latency = spec.latency_ms / 1000
    return s + latency + retransmission_s(n_bytes, s, latency, spec.loss)


class NetworkClock:
    """The simulated time a link's messages take, summed (thread-safe; no sleeping).

    `charge(direction, n, phase)` adds one message; `seconds` is the total, also split
    by direction and by phase (the `ByteMeter` phase: train, eval, control)."""

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        self.seconds = 0.0
        self.by_direction = {UP: 0.0, DOWN: 0.0}
        self.by_phase: dict[str, float] = {}
        self.messages = 0
        self._lock = threading.Lock()

    def charge(self, direction: str, n_bytes: int, phase: str = "control") -> float:
        t = transfer_s(self.spec, direction, n_bytes)
        with self._lock:
            self.seconds += t
            self.by_direction[direction] += t
            self.by_phase[phase] = self.by_phase.get(phase, 0.0) + t
            self.messages += 1
        return t

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "network_s": self.seconds,
                "network_up_s": self.by_direction[UP],
                "network_down_s": self.by_direction[DOWN],
                "network_s_by_phase": dict(self.by_phase),
                "messages": self.messages,
            }


def exchange_s(spec: NetworkSpec, down: list[int], up: list[int]) -> float:
    """One client's share of a federated round: its messages down, then its replies up
    (each message by `transfer_s`, one after another)."""
    return sum(transfer_s(spec, DOWN, n) for n in down) + sum(transfer_s(spec, UP, n) for n in up)
