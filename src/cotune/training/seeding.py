"""Seeds and threads: every random draw in cotune follows from the run's seed.

`derive_seed(seed, purpose, round, client)` gives every party the randomness of any
round without talking to the others, which is what makes a resumed run equal an
uninterrupted one.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch

from cotune.config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(train: TrainConfig) -> None:
    if train.threads is not None:
        torch.set_num_threads(train.threads)


def derive_seed(seed: int, purpose: str, *parts: int) -> int:
    """A 31-bit seed for one purpose and round/client, independent of the others."""
    key = "/".join([purpose, *(str(p) for p in parts)]).encode()
    return (seed * 1_000_003 + zlib.crc32(key)) % (2**31 - 1)
