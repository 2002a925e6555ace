"""Memory-efficient backward (sparse saved activations, activation checkpointing) and
exact memory measurement.

The forward pass stays exact; only what autograd keeps for backward is pruned to a
`memory.keep` share of token rows (`random`, `norm`) or elements (`backrazor`), and/or
(`memory.checkpoint`) each transformer layer keeps only its input and is recomputed in
backward. See `cotune.memory.swap` for what is swapped, the op modules for each
approximation and `cotune.memory.checkpoint` for the recomputation.
"""

from __future__ import annotations

from torch import nn

from cotune.config import MemoryConfig
from cotune.memory.allocator import heap_stats, release_free_memory, tune_allocator
from cotune.memory.checkpoint import checkpoint_layers, checkpointed_layers, uncheckpoint_layers
from cotune.memory.embedding import dense_embedding_grads, sparse_embedding_grads
from cotune.memory.measure import (
    MemoryBreakdown,
    PeakRSS,
    SavedTensorMeter,
    mark_rest,
    model_state_bytes,
    report_saved_bytes,
)
from cotune.memory.pack import Policy, pack_bits, token_mask, unpack_bits
from cotune.memory.swap import make_policy, sparse_op_counts, swap_in, swap_out


def apply_memory_option(
    model: nn.Module, memory: MemoryConfig, seed: int | None = None
) -> nn.Module:
    """Apply `memory` to the device-side `model` (any module subtree) in place.

    The one entry point of the `[memory]` option, called by every method on what runs
    on the device (the whole model, or the device segment of a split model).

    `memory.allocator`: the process's C allocator (`tune_allocator`, once per process).

    `memory.backward` (sparse saving): `"none"` swaps nothing. Otherwise every Linear
    input, attention operand and probability matrix, LayerNorm input and FFN activation
    input named by `memory.ops` is saved sparsely, and dropout saves its mask as bits.
    Row selection for `random` (and backrazor's threshold sampling) uses a private
    generator seeded with `seed` (default: torch's current initial seed), so the global
    RNG stream, and hence dropout, is the same as without the option.

    `memory.checkpoint`: every transformer layer is checkpointed (recomputed in
    backward), over `memory.checkpoint_chunks` slices of the batch; combined with a
    sparse mode, the recomputed layer saves sparsely.

    `memory.step_in_backward`: trainable embedding tables get sparse gradients (the rows
    the batch used), which the optimiser steps in row blocks (`sparse_embedding_grads`).

    Raises `ModelError` if nothing in `model` can be made sparse (a sparse mode) or
    checkpointed (`checkpoint`).
    """
    tune_allocator(memory.allocator)
    if memory.backward not in ("none", "checkpoint"):
        swap_in(model, make_policy(memory, seed))
    if memory.checkpoint or memory.backward == "checkpoint":
        checkpoint_layers(model, memory.checkpoint_chunks)
    if memory.step_in_backward:
        sparse_embedding_grads(model)
    return model


def remove_memory_option(model: nn.Module) -> nn.Module:
    """Undo `apply_memory_option` in place: the stock modules and attention come back,
    and no layer is checkpointed any more."""
    swap_out(model)
    uncheckpoint_layers(model)
    dense_embedding_grads(model)
    return model


__all__ = [
    "MemoryBreakdown",
    "PeakRSS",
    "Policy",
    "SavedTensorMeter",
    "apply_memory_option",
    "heap_stats",
    "checkpoint_layers",
    "checkpointed_layers",
    "dense_embedding_grads",
    "make_policy",
    "mark_rest",
    "model_state_bytes",
    "pack_bits",
    "release_free_memory",
    "remove_memory_option",
    "report_saved_bytes",
    "sparse_embedding_grads",
    "sparse_op_counts",
    "token_mask",
    "tune_allocator",
    "uncheckpoint_layers",
    "unpack_bits",
]
