"""The C allocator of the training process: what it holds, and giving memory back.

CPU tensors are allocated by glibc's malloc. By default glibc serves a block smaller
than its mmap threshold (128 KiB at start, raised dynamically up to 32 MiB as large
blocks are freed) from its heap, and a freed heap block stays in the process (in RSS)
for reuse. A training step allocates and frees hundreds of MiB of activations,
gradients and temporaries in blocks of 1-30 MiB, so after the first steps most of them
come from the heap and the peak RSS keeps the high-water mark of every pattern ever
seen, not the memory in use: a smaller saved-activation footprint can even raise the
peak (other block sizes, more fragmentation).

`tune_allocator("release")` (the default of `memory.allocator`) fixes the mmap threshold
at 64 KiB, so every large block is its own mapping and goes back to the OS when freed,
and trims the heap top above 1 MiB: RSS then follows the memory in use, at the cost of
page faults on fresh blocks (measured in docs/memory.md). Settings given in the
environment (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) are left as they are.

`heap_stats()` reads glibc's counters (mallinfo2): bytes in use and bytes freed but held.
Both are None off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass
from typing import Literal

Allocator = Literal["release", "default"]
ALLOCATORS: tuple[str, ...] = ("release", "default")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024
TRIM_THRESHOLD = 1024 * 1024
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )  # fmt: skip
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallinfo2.restype = _Mallinfo2
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl, macOS): no counters, no mallopt
        return None
    return libc


@dataclass(frozen=True)
class HeapStats:
    """glibc's counters: `in_use` (allocated blocks, heap and mmapped) and `free_held`
    (freed heap bytes the allocator keeps for reuse)."""

    in_use: int
    free_held: int


def heap_stats() -> HeapStats | None:
    libc = _libc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return HeapStats(in_use=int(info.uordblks + info.hblkhd), free_held=int(info.fordblks))


_applied: list[str] = []


def tune_allocator(allocator: Allocator) -> str:
    """Apply `allocator` to this process once (later calls keep the first choice);
    returns what is in effect: "release", "default", or "environment" when the
    environment sets glibc's thresholds itself, "unavailable" off glibc."""
    if _applied:
        return _applied[0]
    libc = _libc()
    if any(k in os.environ for k in _ENV):
        state = "environment"
    elif libc is None:
        state = "unavailable"
    elif allocator == "release":
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        state = "release" if ok else "unavailable"
    else:
        state = "default"
    _applied.append(state)
    return state


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS now (malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
