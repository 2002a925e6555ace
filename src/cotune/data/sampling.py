"""Seeded subsets and splits of example lists (same seed -> same result)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """A generator for one purpose (e.g. "train" subsample), independent of the others."""
    return np.random.default_rng([seed % 2**63, zlib.crc32(purpose.encode())])


def subsample(items: list[T], k: int | None, seed: int, purpose: str) -> list[T]:
    """A seeded random subset of `k` items, kept in their original order (all if k is None)."""
    if k is None or k >= len(items):
        return items
    idx = np.sort(rng_for(seed, purpose).choice(len(items), size=k, replace=False))
    return [items[i] for i in idx]


def stratified_split(
    labels: Sequence[int], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded train/test index lists with each label's share kept in both parts.

    Each label with at least two examples puts round(n * test_fraction) of them (at
    least one, at most n - 1) into test. Both lists come back shuffled.
    """
    rng = rng_for(seed, "split")
    labels_arr = np.asarray(labels)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))
        if len(idx) < 2:
            train.extend(idx.tolist())
            continue
        n_test = min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1)
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return rng.permutation(train).tolist(), rng.permutation(test).tolist()
