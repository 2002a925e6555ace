"""What a method hands back to the runtime, which turns it into summary.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Recorder(Protocol):
    """Where a method reports progress; the runtime backs it with a run folder."""

    def log_eval(self, record: dict[str, Any]) -> None: ...

    def log_train(self, record: dict[str, Any]) -> None: ...


class NullRecorder:
    def log_eval(self, record: dict[str, Any]) -> None:
        pass

    def log_train(self, record: dict[str, Any]) -> None:
        pass


@dataclass
class MethodResult:
    metrics: dict[str, float]
    bytes_up: int = 0
    bytes_down: int = 0
    device_peak_bytes: int | None = None
    saved_activation_bytes: int | None = None
    trainable_device: int = 0
    trainable_cloud: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
