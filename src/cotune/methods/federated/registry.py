"""Which server hook each federated method runs. A new method in the FedAvg family
(e.g. fedpft) registers its hook here; the Flower apps need no change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cotune.config import Config
from cotune.methods.federated.server import GlobalModel, NoHook, ServerHook


def _no_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    return NoHook()


def _kd_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    from cotune.methods.federated.kd import KDHook

    return KDHook(cfg, global_model)


def _pft_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    from cotune.methods.federated.pft import ProxyHook

    return ProxyHook(cfg, global_model)


SERVER_HOOKS: dict[str, Callable[[Config, GlobalModel], ServerHook]] = {
    "fedavg": _no_hook,
    "fedlora": _no_hook,
    "fedkd": _kd_hook,
    "fedpft": _pft_hook,
}


def _pft_client(*args: Any) -> Any:
    from cotune.methods.federated.pft import proxy_local_train

    return proxy_local_train(*args)


# Client-side training per method: `fn(cfg, partition, global_state, server_round[,
# extras])` -> ClientUpdate. `extras` (name -> State) are the message's ArrayRecords
# besides the global state; an update's optional `extras` attribute travels back the
# same way. Methods not listed use `local_train`.
CLIENT_TRAINERS: dict[str, Callable[..., Any]] = {"fedpft": _pft_client}


def client_trainer(cfg: Config) -> Callable[..., Any]:
    if cfg.method in CLIENT_TRAINERS:
        return CLIENT_TRAINERS[cfg.method]
    from cotune.methods.federated.client import local_train

    return local_train


def server_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    if cfg.method not in SERVER_HOOKS:
        raise KeyError(f"{cfg.method!r} is not a federated method; known: {sorted(SERVER_HOOKS)}")
    return SERVER_HOOKS[cfg.method](cfg, global_model)
