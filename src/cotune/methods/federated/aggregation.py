"""Averaging client updates and refusing bad ones (shared by every federated method,
including splitfed's adapter averaging)."""

from __future__ import annotations

import re
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


# ------------------------------------------------------------ adapters of different ranks
#
# fedlora with per-device ranks (HetLoRA, Cho et al. 2024): the global adapter has the
# fleet's largest rank R; a device of rank r receives the first r components of it (rows
# of each LoRA A, columns of each LoRA B) and sends back its trained rank-r factors,
# which the server places into the first r components of R (zero padding) to average.

_LORA_A = re.compile(r"(^|\.)lora_(embedding_)?A(\.|$)")
_LORA_B = re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)")


def rank_axis(name: str) -> int | None:
    """The axis along which tensor `name` holds LoRA rank components: 0 for a LoRA A
    (r x in), 1 for a LoRA B (out x r), None for anything else (the head)."""
    if _LORA_A.search(name):
        return 0
    if _LORA_B.search(name):
        return 1
    return None


def state_rank(state: State) -> int | None:
    """The LoRA rank of `state` (None if it holds no LoRA tensor); all its LoRA tensors
    must agree."""
    ranks = {int(np.shape(v)[axis]) for k, v in state.items() if (axis := rank_axis(k)) is not None}
    if len(ranks) > 1:
        raise ValueError(f"the LoRA tensors of this state have different ranks: {sorted(ranks)}")
    return ranks.pop() if ranks else None


def truncate_rank(state: State, rank: int) -> State:
    """`state` with each LoRA tensor cut to its first `rank` components (what a device of
    that rank receives); other tensors unchanged (the same arrays)."""
    out: State = {}
    for name, value in state.items():
        axis = rank_axis(name)
        if axis is None:
            out[name] = value
            continue
        if value.shape[axis] < rank:
            raise ValueError(f"{name} has rank {value.shape[axis]}, cannot cut it to {rank}")
        out[name] = np.ascontiguousarray(np.take(value, np.arange(rank), axis=axis))
    return out


def rank_average(
    states: Sequence[State],
    weights: Sequence[float],
    reference: State,
    rule: str = "zero_pad",
) -> State:
    """Aggregate adapters of different ranks into `reference`'s shapes (rank R).

    With n_i the weight of update i, r_i its rank and W = sum n_i, component k of a LoRA
    tensor becomes (sum over the i with r_i > k of n_i x_i[k]) / W_k, where

    - `rule = "zero_pad"` (HetLoRA): W_k = W. Each update is padded to rank R with
      zeros and the padded updates are averaged, so a component that few devices hold
      shrinks towards zero by their share of the weight.
    - `rule = "rank_wise"`: W_k = sum of n_i over the i with r_i > k, the average over
      the devices that hold component k; a component no update holds keeps its value
      in `reference`.

    Every other tensor (the head) is the plain weighted average. When every update has
    rank R both rules are `weighted_average`, bit for bit (same products, same order).
    """
    if rule not in ("zero_pad", "rank_wise"):
        raise ValueError(f"unknown rank aggregation rule {rule!r}")
    if not states or len(states) != len(weights):
        raise ValueError("rank_average needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out: State = {}
    for name, ref in reference.items():
        axis = rank_axis(name)
        if axis is None:
            acc = np.zeros(ref.shape, dtype=np.float64)
            for state, w in zip(states, weights, strict=True):
                acc += np.asarray(state[name], dtype=np.float64) * (w / total)
            out[name] = acc.astype(ref.dtype)
            continue
        full = ref.shape[axis]
        ranks = [int(np.shape(state[name])[axis]) for state in states]
        if max(ranks) > full:
            raise ValueError(f"{name}: an update of rank {max(ranks)} exceeds the global {full}")
        held = np.zeros(full, dtype=np.float64)  # W_k
        for r, w in zip(ranks, weights, strict=True):
            held[:r] += w
        denom = np.full(full, total) if rule == "zero_pad" else held
        acc = np.zeros(ref.shape, dtype=np.float64)
        for state, r, w in zip(states, ranks, weights, strict=True):
            # w / W_k for each held component, shaped to broadcast along `axis`
            factor = (w / denom[:r]).reshape([r if d == axis else 1 for d in range(ref.ndim)])
            acc[_along(axis, slice(0, r), ref.ndim)] += (
                np.asarray(state[name], dtype=np.float64) * factor
            )
        if rule == "rank_wise":  # components no update holds keep the reference's values
            unheld = _along(axis, np.flatnonzero(held == 0), ref.ndim)
            acc[unheld] = np.asarray(ref, dtype=np.float64)[unheld]
        out[name] = acc.astype(ref.dtype)
    return out


def _along(axis: int, index: slice | np.ndarray, ndim: int) -> tuple[slice | np.ndarray, ...]:
    """An index selecting `index` along `axis` and everything along the other axes."""
    return tuple(index if d == axis else slice(None) for d in range(ndim))
