"""The federated methods' logic without Flower: data split, client local training,
the global model and its evaluation, server hooks (fedkd distillation), aggregation
and update validation. `cotune.runtime.federated` runs them on Flower."""

from cotune.methods.federated.client import ClientUpdate, local_train
from cotune.methods.federated.registry import SERVER_HOOKS, server_hook
from cotune.methods.federated.server import GlobalModel, NoHook, ServerHook

__all__ = [
    "SERVER_HOOKS",
    "ClientUpdate",
    "GlobalModel",
    "NoHook",
    "ServerHook",
    "local_train",
    "server_hook",
]
