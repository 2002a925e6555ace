"""Which clients train in a round: a seeded sample of partitions, not of node ids.

Node ids are random per launch (and per SuperNode restart), partition ids are not; so
sampling partitions with a generator seeded by (seed, round) picks the same clients
in a resumed run as in an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from cotune.methods.sampling import sample_size
from cotune.training import derive_seed

__all__ = ["sample_partitions", "sample_size"]


def sample_partitions(
    partitions: list[int], fraction: float, seed: int, server_round: int
) -> list[int]:
    """A sorted seeded sample of `partitions` for `server_round`."""
    pool = sorted(partitions)
    k = sample_size(len(pool), fraction)
    if k == len(pool):
        return pool
    rng = np.random.default_rng(derive_seed(seed, "sample", server_round))
    return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))
