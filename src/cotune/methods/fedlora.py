"""`fedlora`: federated LoRA. Clients train LoRA adapters (and the head) on their own
data; the server averages only those, weighted by examples. Far fewer bytes per round
than fedavg; the frozen base never travels.

LoRA defaults to r = 8 on the family's default target modules when `model.lora` is not
given.
"""

from __future__ import annotations

from cotune.config import Config
from cotune.config.schema import LoraConfig
from cotune.methods.federated.client import local_evaluate, local_train
from cotune.methods.spec import FederatedSpec, MethodSpec


def configure(cfg: Config) -> None:
    if cfg.model.lora is None:
        cfg.model.lora = LoraConfig()


SPEC = MethodSpec(
    name="fedlora",
    summary="federated LoRA: clients train adapters, the server averages them",
    runs=FederatedSpec(client_train=local_train, client_evaluate=local_evaluate),
    reads=frozenset({"generation", "federated", "memory", "runtime"}),
    configure=configure,
)
