"""The emulated network of a federated fleet (`[link.network]`), on the simulated clock.

Each call the server makes (a round's training messages, an evaluation on the clients)
sends every sampled client its messages and waits for all replies, so it lasts as long
as its slowest client: the call's network time is the largest, over its clients, of
that client's messages down then its replies up, each costing
`cotune.link.network.transfer_s` on the client's link. A client's link is
`[link.network]`, or its device's named `network` profile (all that profile's figures)
when the device gives one, with the `up_mbps`, `down_mbps` and `latency_ms` its device
profile gives (`federated.devices` / `federated.fleet`; client k is device k mod the
number of devices) over either.

Only the clock is emulated for federated runs: "throttle" is a split link's mode (the
clients' messages cross Flower's own transport, which cotune does not pace).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from cotune.config import Config
from cotune.link.network import PROFILES, NetworkSpec, exchange_s, network_spec

log = logging.getLogger(__name__)


class FleetNetwork:
    def __init__(self, base: NetworkSpec, devices: list[dict[str, Any]]) -> None:
        self.base = base
        self.devices = devices
        self.seconds = 0.0
        self.calls = 0

    @classmethod
    def from_config(cls, cfg: Config) -> FleetNetwork | None:
        """The fleet's network, or None when `[link.network]` is not set."""
        if cfg.link.network is None:
            return None
        base = network_spec(cfg.link.network)
        if base.mode == "throttle":
            log.warning(
                "link.network.mode = 'throttle' applies to split links; this federated run "
                "projects its network time on the clock (metrics.jsonl: projected_wall_s)"
            )
        devices = [
            {"network": d.network, "up_mbps": d.up_mbps, "down_mbps": d.down_mbps,
             "latency_ms": d.latency_ms}
            for d in cfg.federated.devices
        ]  # fmt: skip
        return cls(base, devices)

    def spec_for(self, partition: int) -> NetworkSpec:
        """Client `partition`'s link: the network, with its device's own figures."""
        if not self.devices:
            return self.base
        device = self.devices[partition % len(self.devices)]
        own: dict[str, Any] = {k: v for k, v in device.items() if v is not None and k != "network"}
        base = self.base
        if device.get("network") is not None:  # its named profile, on the network's clock
            name = str(device["network"])
            base = dataclasses.replace(PROFILES[name], mode=base.mode, profile=name)
        spec = dataclasses.replace(base, **own)
        if spec.jitter_ms > spec.latency_ms:
            spec = dataclasses.replace(spec, jitter_ms=spec.latency_ms)
        return spec

    def charge(
        self,
        down: Mapping[int, list[int]],
        up: Mapping[int, list[int]],
        part_of: Mapping[int, int],
    ) -> float:
        """One call's network time (its slowest client), added to `seconds`. `down` / `up`:
        message sizes per node id; `part_of`: node id -> partition (unknown: partition 0)."""
        nodes = {*down, *up}
        t = max(
            (exchange_s(self.spec_for(part_of.get(n, 0)), down.get(n, []), up.get(n, []))
             for n in nodes),
            default=0.0,
        )  # fmt: skip
        self.seconds += t
        self.calls += 1
        return t

    def snapshot(self) -> dict[str, object]:
        return {**self.base.as_dict(), "network_s": self.seconds, "calls": self.calls,
                "offset_s": self.seconds}  # fmt: skip
