"""Exact measurement of memory during training steps.

- `SavedTensorMeter`: bytes of the tensors autograd saves for backward, counted with
  saved-tensor hooks while a forward pass runs. Parameters (and views of them) are not
  activations and are excluded; a storage saved twice is counted once. With activation
  checkpointing (`cotune.memory.checkpoint`) it also counts what each checkpointed layer
  would save, which backward holds again while it recomputes that layer, and reports the
  peak (`peak_bytes`).
- `PeakRSS`: the process's peak resident memory during a region, reset at its start
  through /proc/self/clear_refs (Linux); elsewhere the lifetime peak (ru_maxrss).
- `HeapSampler`: RSS and glibc's heap counters sampled by a thread during a region (the
  sample at the highest RSS, the most heap in use), for `MemoryBreakdown`.
- `MemoryBreakdown`: where a training step's peak RSS goes (see its docstring).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cotune.memory.allocator import HeapStats, heap_stats


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class _Held:
    """What the meter hands autograd for a saved tensor: the tensor, plus a weak
    reference target whose finalizer marks the storage no longer held by the graph."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _Live:
    """Bytes of saved-for-backward storages alive right now, across meters (read by
    `HeapSampler` from its thread)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._refs: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def hold(self, key: tuple[int, int]) -> None:
        with self._lock:
            n = self._refs.get(key, 0)
            if n == 0:
                self.bytes += key[1]
            self._refs[key] = n + 1

    def release(self, key: tuple[int, int]) -> None:
        with self._lock:
            n = self._refs.pop(key) - 1
            if n:
                self._refs[key] = n
            else:
                self.bytes -= key[1]


LIVE_SAVED = _Live()


class SavedTensorMeter(AbstractContextManager["SavedTensorMeter"]):
    """Count bytes saved for backward inside the `with` block (a forward pass).

    `params` are the module parameters whose storages are not counted (weights saved by
    Linear for the input gradient are not activations). Objects that are not plain
    tensors (e.g. packed sparse activations from `cotune.memory`) report their size
    through a `nbytes_saved()` method, or are counted tensor by tensor.

    `bytes` is what autograd holds when the forward pass ends. Under non-reentrant
    activation checkpointing that is the checkpointed layers' inputs plus what the other
    modules save; each checkpointed layer's own saves are dropped and recomputed in
    backward. `recompute_region()` (entered by the checkpointing in each layer's
    forward) counts those saves too, and `peak_bytes` is the largest total held at once:
    `bytes`, or, for the worst layer i, everything saved up to and including layer i's
    input plus layer i's recomputed saves (when backward reaches layer i, what was saved
    after it has been consumed and freed). Without checkpointing `peak_bytes == bytes`. Until the graph lets go of them (after
    their backward), the storages counted are also in `LIVE_SAVED.bytes`, which a
    `HeapSampler` reads at every sample.
    """

    def __init__(self, params: Iterable[torch.Tensor] = ()) -> None:
        self._param_keys = {_storage_key(p) for p in params}
        self._seen: set[tuple[int, int]] = set()
        self.bytes = 0
        self.count = 0
        self.recompute_bytes = 0  # the largest one layer's recomputation keeps
        self._recompute_peak = 0
        self._region_depth = 0
        self._region_base = 0
        self._region_bytes = 0
        self._region_seen: set[tuple[int, int]] = set()
        self._region_hold: list[torch.Tensor] = []
        self._hooks: Any = None

    @property
    def peak_bytes(self) -> int:
        """The most bytes saved for backward that are alive at once (see the class doc)."""
        return max(self.bytes, self._recompute_peak)

    def _pack(self, t: torch.Tensor) -> Any:
        key = _storage_key(t)
        if key in self._param_keys or key[0] == 0:
            return t
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
            self.count += 1
        held = _Held(t)
        LIVE_SAVED.hold(key)
        weakref.finalize(held, LIVE_SAVED.release, key)
        return held

    @staticmethod
    def _unpack(x: Any) -> torch.Tensor:
        return x.t if isinstance(x, _Held) else x

    def _count_recomputed(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if (
            key not in self._param_keys
            and key not in self._seen  # e.g. the layer's input: already held
            and key not in self._region_seen
            and key[0] != 0
        ):
            self._region_seen.add(key)
            self._region_bytes += key[1]
            # checkpoint drops the tensor after its pack hook; held until the layer's
            # forward ends, its storage cannot be freed and reused by a later save of the
            # same layer (which would then look like the same storage). Backward holds
            # these tensors again while it recomputes the layer, so this raises no peak.
            self._region_hold.append(t)

    def _begin_region(self) -> None:
        self._region_depth += 1
        if self._region_depth == 1:
            self._region_base = self.bytes
            self._region_bytes = 0
            self._region_seen = set()
            self._region_hold = []

    def _end_region(self) -> None:
        self._region_depth -= 1
        if self._region_depth == 0:
            self.recompute_bytes = max(self.recompute_bytes, self._region_bytes)
            self._recompute_peak = max(self._recompute_peak, self._region_base + self._region_bytes)
            self._region_seen = set()
            self._region_hold = []

    def add(self, nbytes: int) -> None:
        """Count bytes saved outside autograd's hooks (custom functions' own buffers)."""
        self.bytes += int(nbytes)
        self.count += 1

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)
        self._seen.clear()


_ACTIVE: list[SavedTensorMeter] = []


def report_saved_bytes(nbytes: int) -> None:
    """Called by custom autograd functions that keep buffers outside `save_for_backward`."""
    for meter in _ACTIVE:
        meter.add(nbytes)


@contextmanager
def recompute_region() -> Iterator[None]:
    """Count, for the active meters, what a checkpointed layer saves in its forward.

    Entered inside `torch.utils.checkpoint`'s forward (non-reentrant), where its own
    saved-tensor hooks are the innermost ones: they replace each saved tensor by a
    placeholder, so the meter's hooks see nothing. This pushes a hook that counts the
    tensor and hands it on to checkpoint's hooks unchanged. Backward recomputes the
    same tensors (the same ops on the same inputs), so their size is what backward
    holds again for the layer. No active meter: nothing is pushed.
    """
    meters = list(_ACTIVE)
    # torch has no public accessor for the innermost hooks; this private one is what
    # torch itself uses (AOTAutograd). Without it the recomputation is not counted.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    inner = top(False) if meters and top is not None else None
    if inner is None:
        yield
        return
    pack_inner, unpack_inner = inner

    def pack(t: torch.Tensor) -> Any:
        for meter in meters:
            meter._count_recomputed(t)
        return pack_inner(t)

    for meter in meters:
        meter._begin_region()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack_inner):
            yield
    finally:
        for meter in meters:
            meter._end_region()


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    try:  # /proc/self/statm: size resident shared ... in pages (cheaper than status)
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        kib = _status_kib("VmRSS")
        return kib * 1024 if kib is not None else 0


def lifetime_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS(AbstractContextManager["PeakRSS"]):
    """Peak resident set size of this process during the `with` block, in bytes."""

    _resettable: bool | None = None

    def __init__(self) -> None:
        self.peak_bytes = 0

    @classmethod
    def _reset(cls) -> bool:
        if cls._resettable is False:
            return False
        try:
            _CLEAR_REFS.write_text("5")
            cls._resettable = True
        except OSError:
            cls._resettable = False
        return bool(cls._resettable)

    def __enter__(self) -> PeakRSS:
        self._exact = self._reset()
        return self

    def __exit__(self, *exc: object) -> None:
        kib = _status_kib("VmHWM") if self._exact else None
        self.peak_bytes = kib * 1024 if kib is not None else lifetime_peak_rss_bytes()


class HeapSampler(AbstractContextManager["HeapSampler"]):
    """Sample RSS, the allocator's counters, the saved-for-backward bytes alive
    (`LIVE_SAVED`) and the gradient bytes of `params` every `interval_s` from a thread
    during the `with` block; keeps the heap at the start and the sample with the highest
    RSS. Off glibc and jemalloc the heap fields stay None.

    The thread reads plain numbers only, never a tensor: reading `p.grad` while autograd
    assigns it crashed libtorch (a NULL reference in a Python tensor object, seen as
    segfaults of `cotune memory` rows). Gradient bytes are counted on the training
    thread instead, by a post-accumulate-grad hook on each of `params`: a gradient is
    counted when backward first fills it in the block (the step starts with none, as
    the optimizer sets them to None) and stays counted until the block ends."""

    def __init__(self, params: Iterable[torch.Tensor] = (), interval_s: float = 0.001) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.interval_s = interval_s
        self.start: HeapStats | None = None
        self.peak: Sample | None = None
        self._grads = 0
        self._counted: set[int] = set()
        self._hooks: list[Any] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _grad_filled(self, p: torch.Tensor) -> None:
        if id(p) not in self._counted and p.grad is not None:
            self._counted.add(id(p))
            g = p.grad
            if g.is_sparse:  # an embedding's rows (memory.step_in_backward)
                self._grads += sum(
                    t.numel() * t.element_size() for t in (g._indices(), g._values())
                )
            else:
                self._grads += g.numel() * g.element_size()

    def _sample(self) -> None:
        rss = current_rss_bytes()
        if self.peak is not None and rss < self.peak.rss:
            return
        self.peak = Sample(rss, heap_stats(), LIVE_SAVED.bytes, self._grads)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> HeapSampler:
        self._counted = {id(p) for p in self.params if p.grad is not None}
        self._grads = sum(
            p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None
        )
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_filled)
                       for p in self.params]  # fmt: skip
        self.start = heap_stats()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="cotune-heap-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        for h in self._hooks:
            h.remove()
        self._hooks = []


@dataclass(frozen=True)
class Sample:
    """One sample of `HeapSampler`."""

    rss: int
    heap: HeapStats | None
    saved_live: int
    grads_live: int


@dataclass(frozen=True)
class RestPoint:
    """The process before data and model: its RSS and heap counters."""

    rss: int
    heap: HeapStats | None


_REST: list[RestPoint] = []


def mark_rest() -> RestPoint:
    """Record the process at rest (interpreter and libraries loaded, no data or model
    yet); the first call wins. The runtime calls it before a run builds anything."""
    if not _REST:
        _REST.append(RestPoint(current_rss_bytes(), heap_stats()))
    return _REST[0]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors`."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key[0] != 0:
            seen[key] = key[1]
    return sum(seen.values())


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (/proc/self/maps)."""
    ranges = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages among `tensors` that are resident in this process
    (pages present in its page table: what RSS counts), from /proc/self/pagemap. A
    weight mapped from a file (transformers loads safetensors with mmap) is resident
    only where it was read: an embedding matrix, only the rows of tokens seen. Where
    pagemap cannot be read, all bytes count."""
    storages = {_storage_key(t) for t in tensors}
    exact = sum(n for ptr, n in storages if ptr != 0)
    ranges = sorted(
        (ptr // _PAGE, -(-(ptr + n) // _PAGE)) for ptr, n in storages if ptr != 0 and n > 0
    )
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    try:
        present = 0
        with open("/proc/self/pagemap", "rb") as pagemap:
            for lo, hi in merged:
                pagemap.seek(lo * 8)
                entries = np.frombuffer(pagemap.read((hi - lo) * 8), dtype=np.uint64)
                present += int(((entries >> np.uint64(63)) & np.uint64(1)).sum())
    except OSError:
        return exact
    # whole pages are present or not: a storage's first and last pages may hold others
    return min(present * _PAGE, exact)


def model_state_bytes(
    modules: Iterable[torch.nn.Module], optimizer: torch.optim.Optimizer | None
) -> dict[str, int]:
    """`parameters` (parameters and buffers of `modules`), of which `parameters_mapped`
    are pages of a mapped file (weights loaded with mmap, outside the heap; only their
    resident pages count, `resident_bytes`), `gradients` (one gradient per trainable
    parameter: what backward allocates each step) and `optimizer_state`."""
    mods = list(modules)
    tensors = [t for m in mods for t in (*m.parameters(), *m.buffers())]
    trainable = {id(p): p for m in mods for p in m.parameters() if p.requires_grad}
    state: list[torch.Tensor] = []
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                trainable.setdefault(id(p), p)
                state += [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    maps = _file_mappings()
    mapped = [t for t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in maps)]
    mapped_resident = resident_bytes(mapped)
    return {
        "parameters": tensor_bytes(tensors) - tensor_bytes(mapped) + mapped_resident,
        "parameters_mapped": mapped_resident,
        "gradients": sum(p.numel() * p.element_size() for p in trainable.values()),
        "optimizer_state": tensor_bytes(state),
    }


@dataclass(frozen=True)
class MemoryBreakdown:
    """What the process held at the highest-RSS moment of a training step (bytes).

    Measured directly: `runtime_at_rest` (RSS before data and model: interpreter and
    libraries), `parameters` (parameters and buffers), `optimizer_state`, `gradients`
    and `saved_activations` alive at that moment (gradient tensors; saved-for-backward
    storages the graph still holds), `allocator_retention` (freed heap bytes the
    allocator held beyond what it held at rest, at most the peak's remainder after the
    other parts: glibc also counts free bytes whose pages it returned). From glibc's heap
    counters: `transient` (heap in use at that moment beyond the step's start, other
    than saved activations and gradients: forward/backward temporaries, optimizer
    scratch) and `data_and_other` (heap in use at the step's start beyond rest,
    parameters and optimizer state: data, tokenizer, Python objects). `peak_rss` is the
    kernel's exact high-water mark of the step;
    `unexplained` = peak_rss - the parts (sampling misses the exact peak by up to a
    millisecond; RSS outside the heap can grow, heap pages can be untouched).
    """

    peak_rss: int
    runtime_at_rest: int
    parameters: int
    optimizer_state: int
    gradients: int
    saved_activations: int
    transient: int
    data_and_other: int
    allocator_retention: int

    PARTS = (
        "runtime_at_rest", "parameters", "optimizer_state", "gradients", "saved_activations",
        "transient", "data_and_other", "allocator_retention",
    )  # fmt: skip

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in self.PARTS)

    def as_dict(self) -> dict[str, int]:
        return {
            **asdict(self),
            "parts_total": self.total,
            "unexplained": self.peak_rss - self.total,
        }


def breakdown(
    peak_rss: int, sampler: HeapSampler, state: dict[str, int], rest: RestPoint | None = None
) -> MemoryBreakdown | None:
    """The breakdown of one step, from `state` (`model_state_bytes` at the step's start)
    and `sampler` (run around the step); None off glibc."""
    rest = rest or mark_rest()
    at = sampler.peak
    if sampler.start is None or at is None or at.heap is None or rest.heap is None:
        return None
    in_heap = state["parameters"] - state.get("parameters_mapped", 0) + state["optimizer_state"]
    parts = {
        "runtime_at_rest": rest.rss,
        "parameters": state["parameters"],
        "optimizer_state": state["optimizer_state"],
        "gradients": at.grads_live,
        "saved_activations": at.saved_live,
        "transient": max(at.heap.in_use - sampler.start.in_use - at.saved_live - at.grads_live, 0),
        "data_and_other": max(sampler.start.in_use - rest.heap.in_use - in_heap, 0),
    }
    # glibc counts free heap bytes whether or not their pages are resident (malloc_trim
    # returns the pages of free blocks inside the heap but they stay free bytes): what
    # the allocator holds in RSS is at most what the peak leaves beyond the other parts
    free_held = max(at.heap.free_held - rest.heap.free_held, 0)
    retention = min(free_held, max(peak_rss - sum(parts.values()), 0))
    return MemoryBreakdown(peak_rss=peak_rss, allocator_retention=retention, **parts)
