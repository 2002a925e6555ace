"""Memory-efficient backward (sparse saved activations) and exact memory measurement.

The forward pass stays exact; only what autograd keeps for backward is pruned to a
`memory.keep` share of token rows (`random`, `norm`) or elements (`backrazor`). See
`cotune.memory.swap` for what is swapped and the op modules for each approximation.
"""

from __future__ import annotations

from torch import nn

from cotune.config import MemoryConfig
from cotune.memory.allocator import heap_stats, release_free_memory, tune_allocator
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
    """Apply the `[memory]` section to the device-side `model` (any module subtree) in place.

    First the process's allocator (`memory.allocator`, `tune_allocator`: once per
    process). Then the sparse-saving ops: `memory.backward = "none"` leaves the model
    untouched. Otherwise every Linear input,
    attention operand and probability matrix, LayerNorm input and FFN activation input
    named by `memory.ops` is saved sparsely, and dropout saves its generator state instead
    of its mask. Row selection for `random` (and backrazor's threshold sampling) uses a
    private generator seeded with `seed` (default: torch's current initial seed), so the
    global RNG stream, and hence dropout, is the same as without the option.
    Raises `ModelError` if nothing in `model` can be made sparse.
    """
    tune_allocator(memory.allocator)
    if memory.backward == "none":
        return model
    swap_in(model, make_policy(memory, seed))
    return model


def remove_memory_option(model: nn.Module) -> nn.Module:
    """Undo `apply_memory_option` in place: the stock modules and attention come back."""
    swap_out(model)
    return model


__all__ = [
    "MemoryBreakdown",
    "PeakRSS",
    "Policy",
    "SavedTensorMeter",
    "apply_memory_option",
    "heap_stats",
    "make_policy",
    "mark_rest",
    "model_state_bytes",
    "pack_bits",
    "release_free_memory",
    "remove_memory_option",
    "report_saved_bytes",
    "sparse_op_counts",
    "token_mask",
    "tune_allocator",
    "unpack_bits",
]
