"""Throttling: really spending a message's network time, by sleeping where the bytes pass.

`TokenBucket` paces one direction at its rate: a message of n bytes leaves when the
bucket holds n bytes' worth of tokens (it refills at the rate, up to `burst` bytes, so
an idle link cannot bank more than one burst). `Pacer` paces both directions, then
sleeps the propagation delay, drawing jitter (uniform in latency +- jitter) and loss
(each of the message's segments lost with probability p; a message that lost any waits
one round trip more, and its lost segments cost their serialization again) from its own
seeded generator. Transports call `Pacer.pace` with each message's counted bytes; the
expected time it sleeps is `cotune.link.network.transfer_s`.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable

from cotune.link.accounting import DOWN, UP
from cotune.link.network import MSS_BYTES, NetworkSpec

DEFAULT_BURST_BYTES = 16 * 1024

Sleep = Callable[[float], None]
Now = Callable[[], float]


class TokenBucket:
    """Bytes at `rate` bytes/s with bursts of at most `burst` bytes (thread-safe: senders
    queue behind each other, as on one wire)."""

    def __init__(
        self,
        rate: float,
        burst: int = DEFAULT_BURST_BYTES,
        *,
        now: Now = time.perf_counter,
        sleep: Sleep = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate}")
        self.rate = rate
        self.burst = burst
        self._now = now
        self._sleep = sleep
        self._tokens = float(burst)
        self._last = now()
        self._lock = threading.Lock()

    def take(self, n_bytes: int) -> float:
        """Wait until `n_bytes` may pass; returns the seconds waited."""
        with self._lock:
            now = self._now()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n_bytes  # a debt when negative: paid by waiting
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                self._sleep(wait)
                self._tokens = 0.0
                self._last = self._now()
            return wait


class Pacer:
    """Paces messages over `spec`'s link: rate per direction, then delay and loss."""

    def __init__(
        self,
        spec: NetworkSpec,
        seed: int = 0,
        *,
        burst: int = DEFAULT_BURST_BYTES,
        now: Now = time.perf_counter,
        sleep: Sleep = time.sleep,
    ) -> None:
        self.spec = spec
        self.buckets = {
            d: TokenBucket(spec.rate_bytes_per_s(d), burst, now=now, sleep=sleep)
            for d in (UP, DOWN)
        }
        self.rng = random.Random(seed)
        self._sleep = sleep
        self._now = now
        self._lock = threading.Lock()
        self.slept_s = 0.0

    def _delay_s(self, direction: str, n_bytes: int) -> float:
        spec = self.spec
        latency = spec.latency_ms / 1000
        with self._lock:
            jitter = (
                self.rng.uniform(-spec.jitter_ms, spec.jitter_ms) / 1000 if spec.jitter_ms else 0.0
            )
            resend = 0.0
            if spec.loss > 0:
                segments = math.ceil(n_bytes / MSS_BYTES)
                lost = sum(self.rng.random() < spec.loss for _ in range(segments))
                if lost:
                    # lost segments are sent again, and may be lost again
                    again = lost
                    while again:
                        again = sum(self.rng.random() < spec.loss for _ in range(again))
                        lost += again
                    rate = spec.rate_bytes_per_s(direction)
                    resend = lost * (n_bytes / segments) / rate + 2 * latency
        return max(0.0, latency + jitter) + resend

    def pace(self, direction: str, n_bytes: int) -> float:
        """Sleep for one message of `n_bytes` in `direction`; returns the seconds spent."""
        t0 = self._now()
        self.buckets[direction].take(n_bytes)
        delay = self._delay_s(direction, n_bytes)
        if delay > 0:
            self._sleep(delay)
        spent = self._now() - t0
        with self._lock:
            self.slept_s += spent
        return spent
