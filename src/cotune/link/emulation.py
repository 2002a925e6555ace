"""`EmulatedLink`: what a transport calls for each message when `[link.network]` is set.

Every message is charged to the link's `NetworkClock` (simulated time, no sleeping);
in "throttle" mode it is also paced (`cotune.link.pacing`), so the run really takes the
network's time. Either way the run's projected time is its measured time minus what
pacing slept plus what the clock charged (`offset_s`): in clock mode the compute time
plus the network's, in throttle mode about the measured time itself.

Transports emulate the link on the device's side only (both directions: up before a
message leaves, down as its answer arrives), so a message is never charged twice.
"""

from __future__ import annotations

from typing import Any

from cotune.config import NetworkConfig
from cotune.link.accounting import GRPC_PREFIX_BYTES
from cotune.link.network import NetworkClock, NetworkSpec, network_spec
from cotune.link.pacing import Pacer


class EmulatedLink:
    def __init__(self, spec: NetworkSpec, seed: int = 0) -> None:
        self.spec = spec
        self.clock = NetworkClock(spec)
        self.pacer = Pacer(spec, seed) if spec.mode == "throttle" else None

    @classmethod
    def from_config(cls, cfg: NetworkConfig | None, seed: int = 0) -> EmulatedLink | None:
        """The link `[link.network]` describes, or None when it is not set."""
        return None if cfg is None else cls(network_spec(cfg), seed)

    def carry(self, direction: str, data: bytes, phase: str = "control") -> None:
        """One serialized message crossing in `direction` (counted as `ByteMeter` does)."""
        n = len(data) + GRPC_PREFIX_BYTES
        self.clock.charge(direction, n, phase)
        if self.pacer is not None:
            self.pacer.pace(direction, n)

    @property
    def slept_s(self) -> float:
        return self.pacer.slept_s if self.pacer is not None else 0.0

    def offset_s(self) -> float:
        """Projected minus measured time: the clock's network time less what was slept."""
        return self.clock.seconds - self.slept_s

    def snapshot(self) -> dict[str, Any]:
        return {**self.spec.as_dict(), **self.clock.snapshot(), "slept_s": self.slept_s,
                "offset_s": self.offset_s()}  # fmt: skip
