"""Per-device limits a cloud enforces on its streams, before any message is decoded.

`StreamGuard` admits a device's stream only while the device has fewer than
`max_streams_per_device` open, gives each admitted stream a `Ticket`, and
- charges every message to the device's token bucket (`messages_per_s`, bursts of up to
  `burst` messages): a device over its rate is cut off (`TooLarge`, RESOURCE_EXHAUSTED);
- cancels a stream that has not delivered a whole message for `idle_s` seconds (a device
  that stalls, mid-message or between messages), through the `cancel` callback the
  transport gave, so its worker thread and buffers are released.

The message size limit itself is the transport's (gRPC refuses a message whose length
prefix is over the limit before it reads the message). Nothing here knows what the
messages mean.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cotune.link.errors import TooLarge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_streams_per_device: int = 2
    messages_per_s: float = 200.0
    burst: int = 400
    idle_s: float = 900.0

    def __post_init__(self) -> None:
        if self.max_streams_per_device < 1 or self.messages_per_s <= 0 or self.burst < 1:
            raise ValueError(f"invalid link limits {self}")
        if self.idle_s <= 0:
            raise ValueError(f"idle_s must be > 0, got {self.idle_s}")


class _Bucket:
    """A token bucket: `rate` tokens a second, at most `capacity` saved up."""

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate = rate
        self.capacity = float(capacity)
        self.level = float(capacity)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < 1.0:
            return False
        self.level -= 1.0
        return True


class Ticket:
    """One admitted stream of a device."""

    def __init__(self, guard: StreamGuard, device_id: int, cancel: Callable[[], object]) -> None:
        self.guard = guard
        self.device_id = device_id
        self.cancel = cancel
        self.last = time.monotonic()
        self.closed = False
        self.cut_off = False

    def message(self, nbytes: int) -> None:
        """A whole message of `nbytes` arrived: charge it, or raise `TooLarge`."""
        self.last = time.monotonic()
        if not self.guard._take(self.device_id):
            self.cut_off = True
            raise TooLarge(
                f"device {self.device_id}: over {self.guard.limits.messages_per_s:g} "
                f"messages/s (bursts of {self.guard.limits.burst}); the stream is closed"
            )

    def close(self) -> None:
        self.guard._close(self)


class StreamGuard:
    """Stream admission, rate limits and stall detection for all devices of a cloud."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._open: dict[int, list[Ticket]] = {}
        self._buckets: dict[int, _Bucket] = {}
        self.refused_streams = 0
        self.stalled_streams = 0
        self.rate_limited = 0
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()

    def admit(self, device_id: int, cancel: Callable[[], object]) -> Ticket:
        """A ticket for a new stream of `device_id`; `TooLarge` when it has too many."""
        with self._lock:
            tickets = self._open.setdefault(device_id, [])
            if len(tickets) >= self.limits.max_streams_per_device:
                self.refused_streams += 1
                raise TooLarge(
                    f"device {device_id} already has {len(tickets)} open streams "
                    f"(at most {self.limits.max_streams_per_device})"
                )
            ticket = Ticket(self, device_id, cancel)
            tickets.append(ticket)
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="cotune-link-watchdog", daemon=True
                )
                self._watchdog.start()
        return ticket

    def open_streams(self, device_id: int) -> int:
        with self._lock:
            return len(self._open.get(device_id, []))

    def _take(self, device_id: int) -> bool:
        with self._lock:
            bucket = self._buckets.get(device_id)
            if bucket is None:
                bucket = _Bucket(self.limits.messages_per_s, self.limits.burst)
                self._buckets[device_id] = bucket
            ok = bucket.take()
            if not ok:
                self.rate_limited += 1
            return ok

    def _close(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.closed:
                return
            ticket.closed = True
            tickets = self._open.get(ticket.device_id, [])
            if ticket in tickets:
                tickets.remove(ticket)

    def _watch(self) -> None:
        period = min(1.0, self.limits.idle_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                stale = [
                    t
                    for tickets in self._open.values()
                    for t in tickets
                    if now - t.last > self.limits.idle_s
                ]
            for ticket in stale:
                log.warning(
                    "device %s: no whole message for %.0f s; closing the stream",
                    ticket.device_id,
                    now - ticket.last,
                )
                with self._lock:
                    self.stalled_streams += 1
                ticket.cancel()
                self._close(ticket)

    def stop(self) -> None:
        self._stop.set()
