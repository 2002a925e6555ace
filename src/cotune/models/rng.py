"""Private streams of torch's CPU random number generator.

Dropout and LoRA initialisation draw from torch's global generator. Where several
parties share one process (a split run's device and cloud, splitfed's simulated devices
as threads), each swaps its own stream in around its work, under one process-wide lock,
so what it draws depends only on its seed and not on what else the process does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

RNG_LOCK = threading.RLock()  # held while a stream is swapped in, and while models build


class RngStream:
    """A private stream of torch's CPU RNG, swapped in by `scope()`.

    Each side of a split run consumes its own stream around its forward passes, so
    dropout masks depend only on the seed and the side: in-process and over gRPC a run
    draws the same masks. Giving both sides one stream reproduces the unsplit model's
    masks (the forward order is the same), which the equivalence tests use.
    """

    def __init__(self, seed: int, stream: int) -> None:
        g = torch.Generator()
        g.manual_seed(seed * 1_000_003 + stream)
        self.state = g.get_state()

    @contextmanager
    def scope(self) -> Iterator[None]:
        with RNG_LOCK:
            outer = torch.get_rng_state()
            torch.set_rng_state(self.state)
            try:
                yield
            finally:
                self.state = torch.get_rng_state()
                torch.set_rng_state(outer)
