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

`"jemalloc"`: the process runs on jemalloc instead, with freed pages returned to the OS
at once (`MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0` unless the environment gives
one). An allocator can only be chosen when a process starts: the `cotune` command
restarts itself with jemalloc preloaded (`cotune.runtime.process_allocator`), and its
child processes inherit it. A process that did not start on jemalloc keeps glibc with the
"release" settings and says so.

`heap_stats()` reads the allocator's counters: bytes in use and bytes freed but held
(glibc's mallinfo2, or jemalloc's `stats.allocated` and `stats.resident`). None off both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Literal

Allocator = Literal["release", "default", "jemalloc"]
ALLOCATORS: tuple[str, ...] = ("release", "default", "jemalloc")
JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"
# where distributions install jemalloc's shared library (Debian/Ubuntu: libjemalloc2)
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)

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


@functools.cache
def _jemalloc() -> ctypes.CDLL | None:
    """This process's jemalloc when it runs on it (preloaded), else None."""
    try:
        lib = ctypes.CDLL(None)
        mallctl = lib.mallctl
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                        ctypes.c_void_p, ctypes.c_size_t]  # fmt: skip
    mallctl.restype = ctypes.c_int
    return lib


def running_jemalloc() -> bool:
    """Whether this process allocates with jemalloc."""
    return _jemalloc() is not None


def find_jemalloc() -> str | None:
    """The path of jemalloc's shared library on this machine, or None."""
    for path in (os.environ.get("COTUNE_JEMALLOC"), *JEMALLOC_PATHS):
        if path and os.path.isfile(path):
            return path
    return None


def _jemalloc_stat(lib: ctypes.CDLL, name: str) -> int | None:
    value = ctypes.c_size_t(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if lib.mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return int(value.value)


def _jemalloc_stats(lib: ctypes.CDLL) -> HeapStats | None:
    epoch = ctypes.c_uint64(1)  # refresh the counters
    size = ctypes.c_size_t(ctypes.sizeof(epoch))
    lib.mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(size), ctypes.byref(epoch),
                ctypes.sizeof(epoch))  # fmt: skip
    allocated = _jemalloc_stat(lib, "stats.allocated")
    resident = _jemalloc_stat(lib, "stats.resident")
    if allocated is None or resident is None:  # built without statistics
        return None
    return HeapStats(in_use=allocated, free_held=max(resident - allocated, 0))


@dataclass(frozen=True)
class HeapStats:
    """The allocator's counters: `in_use` (allocated blocks: glibc's heap and mmapped,
    jemalloc's `stats.allocated`) and `free_held` (freed bytes the allocator keeps in the
    process: glibc's free heap bytes, jemalloc's resident minus allocated)."""

    in_use: int
    free_held: int


def heap_stats() -> HeapStats | None:
    je = _jemalloc()
    if je is not None:
        return _jemalloc_stats(je)
    libc = _libc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return HeapStats(in_use=int(info.uordblks + info.hblkhd), free_held=int(info.fordblks))


_applied: list[str] = []


def tune_allocator(allocator: Allocator) -> str:
    """Apply `allocator` to this process once (later calls keep the first choice);
    returns what is in effect: "jemalloc" (the process runs on it, whatever was asked),
    "release", "default", "environment" when the environment sets glibc's thresholds
    itself, "unavailable" off glibc. "jemalloc" asked of a process that started on glibc
    warns and applies "release"."""
    if _applied:
        return _applied[0]
    libc = _libc()
    in_env = any(k in os.environ for k in _ENV)
    if allocator == "jemalloc" and not running_jemalloc():
        if libc is not None and not in_env:
            warnings.warn(
                'memory.allocator = "jemalloc" takes effect when a process starts on it (the '
                "cotune command restarts itself so); this process keeps glibc with the "
                '"release" settings',
                stacklevel=2,
            )
        allocator = "release"
    if running_jemalloc():
        state = "jemalloc"
    elif in_env:
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
    """Give the heap's free pages back to the OS now (glibc's malloc_trim; jemalloc
    returns them by itself)."""
    if running_jemalloc():
        return
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
