"""Averaging client updates and refusing bad ones (shared by every federated method,
including splitfed's adapter averaging)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cotune.methods.spec import State


def check_update(update: State, reference: State) -> str | None:
    """Why `update` cannot be aggregated into `reference`, or None if it can.

    An update must carry exactly the reference's tensors, each with the same shape, a
    floating dtype, and only finite values.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in reference.items():
        value = np.asarray(update[name])
        if value.shape != ref.shape:
            return f"{name} has shape {value.shape}, expected {ref.shape}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{name} has dtype {value.dtype}, expected a float type"
        if not np.all(np.isfinite(value)):
            return f"{name} holds NaN or Inf"
    return None


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> State:
    """Sum of `states` weighted by `weights / sum(weights)`, accumulated in float64 in
    the given order (callers fix the order so results are reproducible) and cast back
    to each tensor's dtype."""
    if not states or len(states) != len(weights):
        raise ValueError("weighted_average needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out: State = {}
    for name, first in states[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for state, w in zip(states, weights, strict=True):
            acc += np.asarray(state[name], dtype=np.float64) * (w / total)
        out[name] = acc.astype(first.dtype)
    return out
