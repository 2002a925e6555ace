"""Byte accounting: the one place bytes on the wire are counted.

Transports call `ByteMeter.record` with the exact bytes they hand to the wire (the
serialized protobuf message) and `record_metadata` with the call metadata they send.
Each message also costs gRPC's 5-byte length prefix (1 compression flag + 4 length
bytes); the in-process transport counts the same, so both transports report identical
figures. Below that layer (HTTP/2 frame headers, HPACK, TLS records, TCP/IP) nothing is
counted: those depend on the network stack, not on cotune.

"up" is device -> cloud, "down" is cloud -> device. Bytes are also split by phase
(`train`, `eval`, `control`), set by whoever drives the link.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

GRPC_PREFIX_BYTES = 5
UP, DOWN = "up", "down"

Tap = Callable[[str, bytes], None]


class ByteMeter:
    def __init__(self, tap: Tap | None = None) -> None:
        self.up = 0
        self.down = 0
        self.messages = {UP: 0, DOWN: 0}
        self.by_phase: dict[str, dict[str, int]] = {}
        self.phase = "control"
        self.tap = tap
        self._lock = threading.Lock()

    def _add(self, direction: str, n: int) -> None:
        with self._lock:
            if direction == UP:
                self.up += n
            elif direction == DOWN:
                self.down += n
            else:
                raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
            phase = self.by_phase.setdefault(self.phase, {UP: 0, DOWN: 0})
            phase[direction] += n

    def record(self, direction: str, data: bytes) -> None:
        """One serialized message of `data` went (or came) over the wire."""
        self._add(direction, len(data) + GRPC_PREFIX_BYTES)
        with self._lock:
            self.messages[direction] += 1
        if self.tap is not None:
            self.tap(direction, data)

    def record_metadata(self, direction: str, pairs: Iterable[tuple[str, str]]) -> None:
        """Call metadata (device id, bearer token) sent once when a stream opens."""
        self._add(direction, sum(len(k) + len(v) for k, v in pairs))

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "bytes_up": self.up,
                "bytes_down": self.down,
                "messages_up": self.messages[UP],
                "messages_down": self.messages[DOWN],
                "by_phase": {k: dict(v) for k, v in self.by_phase.items()},
            }
