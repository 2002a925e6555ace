"""Federated methods on Flower: the ServerApp and ClientApp (`apps`), the strategy,
byte counting from serialised messages, checkpoints, and the two engines.

The package import stays light (no torch): a SuperNode imports `apps` in a fresh
process for every message.
"""

from typing import Any

__all__ = ["run_federated"]


def __getattr__(name: str) -> Any:
    if name == "run_federated":
        from cotune.runtime.federated.engine import run_federated

        return run_federated
    raise AttributeError(name)
