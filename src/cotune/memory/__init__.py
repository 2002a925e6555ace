"""Memory-efficient backward (sparse saved activations) and exact memory measurement."""

from __future__ import annotations

from torch import nn

from cotune.config import MemoryConfig
from cotune.errors import ConfigError
from cotune.memory.measure import PeakRSS, SavedTensorMeter, report_saved_bytes


def apply_memory_option(model: nn.Module, memory: MemoryConfig) -> nn.Module:
    """Swap sparse-saving ops into the device-side `model` as `memory` asks."""
    if memory.backward == "none":
        return model
    raise ConfigError(
        f"memory.backward = {memory.backward!r} is not available in this build; valid: 'none'."
    )


__all__ = ["PeakRSS", "SavedTensorMeter", "apply_memory_option", "report_saved_bytes"]
