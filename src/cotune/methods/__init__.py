"""One module per method; each composes data, models, link and memory."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from cotune.config.schema import METHODS
from cotune.errors import ConfigError
from cotune.methods.result import MethodResult, NullRecorder, Recorder

# method name -> module implementing `run(cfg, recorder, run_dir) -> MethodResult`
_MODULES: dict[str, str] = {
    "centralized": "cotune.methods.centralized",
    "split": "cotune.methods.split",
    "splitfed": "cotune.methods.splitfed",
    "fedavg": "cotune.methods.fedavg",
    "fedlora": "cotune.methods.fedlora",
    "fedkd": "cotune.methods.fedkd",
    "fedpft": "cotune.methods.fedpft",
}


def get_method(name: str) -> Callable[..., MethodResult]:
    if name not in _MODULES:
        available = ", ".join(sorted(_MODULES))
        planned = ", ".join(m for m in METHODS if m not in _MODULES)
        raise ConfigError(
            f"method {name!r} is not available; valid methods: {available}"
            + (f" (not yet in this build: {planned})" if planned else "")
            + "."
        )
    return importlib.import_module(_MODULES[name]).run


def available_methods() -> list[str]:
    return sorted(_MODULES)


__all__ = ["MethodResult", "NullRecorder", "Recorder", "available_methods", "get_method"]
