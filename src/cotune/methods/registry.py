"""The method registry: one line per method, read by everything that needs to know the
methods (config validation, the CLI, resume, which cloud `cotune cloud` serves).

`METHODS` maps a method name to the module whose `SPEC` declares it (imported on first
use, so a Flower ClientApp process loads only its own method). `register(spec)` adds a
method defined elsewhere (a plugin, or a test's toy method) for this process.
"""

from __future__ import annotations

import importlib
import warnings

from cotune.config import Config
from cotune.config.schema import unused_sections
from cotune.errors import ConfigError
from cotune.link.network import network_spec
from cotune.methods.protection import check_protection
from cotune.methods.spec import FederatedSpec, MethodSpec

METHODS: dict[str, str] = {
    "centralized": "cotune.methods.centralized",
    "split": "cotune.methods.split",
    "splitfed": "cotune.methods.splitfed",
    "fedavg": "cotune.methods.fedavg",
    "fedlora": "cotune.methods.fedlora",
    "fedkd": "cotune.methods.fedkd",
    "fedpft": "cotune.methods.fedpft",
}

_registered: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> None:
    """Make `spec` available under `spec.name` in this process."""
    _registered[spec.name] = spec


def unregister(name: str) -> None:
    _registered.pop(name, None)


def method_names() -> list[str]:
    return sorted({*METHODS, *_registered})


def get_spec(name: str) -> MethodSpec:
    """The spec of method `name`; a `ConfigError` naming the valid methods otherwise."""
    if name in _registered:
        return _registered[name]
    if name not in METHODS:
        raise ConfigError(
            f"method {name!r} is not a cotune method; valid methods: {', '.join(method_names())}."
        )
    spec = importlib.import_module(METHODS[name]).SPEC
    if not isinstance(spec, MethodSpec) or spec.name != name:
        raise TypeError(f"{METHODS[name]}.SPEC must be the MethodSpec of {name!r}")
    return spec


def resolve(cfg: Config) -> Config:
    """Check `cfg` against its method's rules, fill the method's defaults, and warn
    about optional sections the method does not read. Idempotent; returns `cfg`."""
    spec = get_spec(cfg.method)
    check_protection(cfg, spec, _capable)
    spec.configure(cfg)
    check_base_dtype(cfg)
    check_device_ranks(cfg, spec)
    if cfg.link.network is not None and "link" in spec.reads:
        network_spec(cfg.link.network)  # a profile's jitter over an overridden latency
    if cfg._reads is None:
        for section in unused_sections(cfg._given, spec.reads):
            warnings.warn(
                f"[{section}] is not read by method '{cfg.method}' and is ignored.",
                UserWarning,
                stacklevel=2,
            )
    cfg._reads = spec.reads
    return cfg


def check_base_dtype(cfg: Config) -> None:
    """`model.base_dtype` other than fp32 stores the frozen base in bf16 / int8, which
    only LoRA leaves frozen: a `ConfigError` without `model.lora` (after the method
    filled its defaults, so a method that always uses LoRA passes)."""
    if cfg.model.base_dtype != "fp32" and cfg.model.lora is None:
        raise ConfigError(
            f"model.base_dtype = {cfg.model.base_dtype!r} stores the frozen base model in "
            f"{cfg.model.base_dtype}, which needs LoRA (full fine-tuning trains every "
            "weight, and an int8 or bf16 weight cannot train here): add a [model.lora] "
            "section, or set model.base_dtype = 'fp32'."
        )


def check_device_ranks(cfg: Config, spec: MethodSpec) -> None:
    """Per-device LoRA ranks (`federated.client_ranks`, ranks in `federated.devices`)
    need a method that aggregates adapters of different ranks: a `ConfigError` for a
    method that reads `[federated]` otherwise (the others warn that it is unused)."""
    fed = cfg.federated
    if fed.client_ranks is None and not any(d.rank is not None for d in fed.devices):
        return
    if "federated" not in spec.reads or _ranks_ok(spec):
        return
    able = [n for n in method_names() if _ranks_ok(get_spec(n))]
    raise ConfigError(
        f"method {cfg.method!r} trains one model shape on every device; per-device LoRA "
        f"ranks (federated.client_ranks, or a rank in federated.devices / the fleet file) "
        f"need {' or '.join(repr(n) for n in able) or 'a rank-aware method'}: drop the "
        "ranks or change the method"
    )


def _capable(flag: str) -> list[str]:
    """The federated methods whose `FederatedSpec` has `flag` set (imports every
    method: for error messages only)."""
    out = []
    for name in method_names():
        runs = get_spec(name).runs
        if isinstance(runs, FederatedSpec) and getattr(runs, flag):
            out.append(name)
    return out


def _ranks_ok(spec: MethodSpec) -> bool:
    runs = spec.runs
    return isinstance(runs, FederatedSpec) and runs.device_ranks


def federated_spec(cfg: Config) -> FederatedSpec:
    """The federated part of `cfg.method`'s spec (a `ConfigError` if it has none)."""
    spec = get_spec(cfg.method)
    if not isinstance(spec.runs, FederatedSpec):
        raise ConfigError(f"method {cfg.method!r} is not a federated method")
    return spec.runs
