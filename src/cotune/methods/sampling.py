"""How many clients train in a round (shared by the runtime's sampling and the privacy
and secure-aggregation checks, which depend on it)."""

from __future__ import annotations

import math


def sample_size(n_available: int, fraction: float) -> int:
    """`fraction` of the clients, rounded to nearest, at least one."""
    return max(1, min(n_available, int(math.floor(fraction * n_available + 0.5))))
