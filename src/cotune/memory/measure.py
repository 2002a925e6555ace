"""Exact measurement of memory during training steps.

- `SavedTensorMeter`: bytes of the tensors autograd saves for backward, counted with
  saved-tensor hooks while a forward pass runs. Parameters (and views of them) are not
  activations and are excluded; a storage saved twice is counted once.
- `PeakRSS`: the process's peak resident memory during a region, reset at its start
  through /proc/self/clear_refs (Linux); elsewhere the lifetime peak (ru_maxrss).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class SavedTensorMeter(AbstractContextManager["SavedTensorMeter"]):
    """Count bytes saved for backward inside the `with` block.

    `params` are the module parameters whose storages are not counted (weights saved by
    Linear for the input gradient are not activations). Objects that are not plain
    tensors (e.g. packed sparse activations from `cotune.memory`) report their size
    through a `nbytes_saved()` method, or are counted tensor by tensor.
    """

    def __init__(self, params: Iterable[torch.Tensor] = ()) -> None:
        self._param_keys = {_storage_key(p) for p in params}
        self._seen: set[tuple[int, int]] = set()
        self.bytes = 0
        self.count = 0
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._param_keys and key not in self._seen and key[0] != 0:
            self._seen.add(key)
            self.bytes += key[1]
            self.count += 1
        return t

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
