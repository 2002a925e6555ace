"""Seeds derived from (run seed, purpose, round, client): every party can recompute the
randomness of any round, which is what makes a resumed run equal an uninterrupted one."""

from __future__ import annotations

import zlib


def derive_seed(seed: int, purpose: str, *parts: int) -> int:
    """A 31-bit seed for one purpose and round/client, independent of the others."""
    key = "/".join([purpose, *(str(p) for p in parts)]).encode()
    return (seed * 1_000_003 + zlib.crc32(key)) % (2**31 - 1)
