"""A cap on the training process's memory (`memory.max_device_mib`).

The runtime measures a run's need before training and refuses a run that would not fit
(`cotune.runtime.memory_cap`); during training, `fit` calls `check_memory_cap` after
every step with the step's peak RSS, so a run that grows past the cap (longer batches
than the measurement saw) stops at once with the same kind of message instead of being
killed by the kernel.
"""

from __future__ import annotations

from cotune.errors import UserError

MiB = 1 << 20
_CAP: list[int] = []


class MemoryCapExceeded(UserError):
    """The device process needs more memory than its cap allows."""


def set_memory_cap(cap_bytes: int | None) -> None:
    """Cap this process's peak RSS at `cap_bytes` (None: no cap)."""
    _CAP.clear()
    if cap_bytes is not None:
        _CAP.append(int(cap_bytes))


def memory_cap() -> int | None:
    return _CAP[0] if _CAP else None


def check_memory_cap(peak_bytes: int) -> None:
    """Raise `MemoryCapExceeded` if a step's peak RSS went past the cap."""
    cap = memory_cap()
    if cap is not None and peak_bytes > cap:
        raise MemoryCapExceeded(
            f"the device process reached {peak_bytes / MiB:,.0f} MiB of memory during a "
            f"training step, above its cap of {cap / MiB:,.0f} MiB (memory.max_device_mib, "
            '--max-memory). Lower the need (memory.backward = "norm", memory.checkpoint = '
            "true, a smaller train.batch_size or train.max_seq_len) or raise the cap; "
            "`cotune memory CONFIG` shows where the memory goes."
        )
