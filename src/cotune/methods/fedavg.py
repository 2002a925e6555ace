"""`fedavg`: every client fine-tunes the whole model on its own data for the round's
local steps; the server averages the full weights, weighted by examples.

Everything it needs is the shared federated machinery: the client round is
`local_train`, the server keeps the aggregate as is (no hook).
"""

from __future__ import annotations

from cotune.config import Config
from cotune.errors import ConfigError
from cotune.methods.federated.client import local_evaluate, local_train
from cotune.methods.spec import FederatedSpec, MethodSpec


def configure(cfg: Config) -> None:
    if cfg.model.lora is not None:
        raise ConfigError(
            "method 'fedavg' fine-tunes and averages full weights; remove model.lora "
            "or use method = 'fedlora'"
        )


SPEC = MethodSpec(
    name="fedavg",
    summary="federated averaging of the full weights",
    runs=FederatedSpec(
        client_train=local_train,
        client_evaluate=local_evaluate,
        differential_privacy=True,
        secure_aggregation=True,
    ),
    reads=frozenset({"generation", "federated", "link", "memory", "privacy", "runtime"}),
    configure=configure,
)
