"""Exact measurement of memory during training steps.

- `SavedTensorMeter`: bytes of the tensors autograd saves for backward, counted with
  saved-tensor hooks while a forward pass runs. Parameters (and views of them) are not
  activations and are excluded; a storage saved twice is counted once. With activation
  checkpointing (`cotune.memory.checkpoint`) it also counts what each checkpointed layer
  would save, which backward holds again while it recomputes that layer, and reports the
  peak (`peak_bytes`).
- `PeakRSS`: the process's peak resident memory during a region, reset at its start
  through /proc/self/clear_refs (Linux); elsewhere the lifetime peak (ru_maxrss).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


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
    after it has been consumed and freed). Without checkpointing `peak_bytes == bytes`.
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

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._param_keys and key not in self._seen and key[0] != 0:
            self._seen.add(key)
            self.bytes += key[1]
            self.count += 1
        return t

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
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
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


def current_rss_bytes() -> int:
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
