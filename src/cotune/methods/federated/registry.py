"""Which server hook each federated method runs. A new method in the FedAvg family
(e.g. fedpft) registers its hook here; the Flower apps need no change."""

from __future__ import annotations

from collections.abc import Callable

from cotune.config import Config
from cotune.methods.federated.server import GlobalModel, NoHook, ServerHook


def _no_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    return NoHook()


def _kd_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    from cotune.methods.federated.kd import KDHook

    return KDHook(cfg, global_model)


SERVER_HOOKS: dict[str, Callable[[Config, GlobalModel], ServerHook]] = {
    "fedavg": _no_hook,
    "fedlora": _no_hook,
    "fedkd": _kd_hook,
}


def server_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    if cfg.method not in SERVER_HOOKS:
        raise KeyError(f"{cfg.method!r} is not a federated method; known: {sorted(SERVER_HOOKS)}")
    return SERVER_HOOKS[cfg.method](cfg, global_model)
