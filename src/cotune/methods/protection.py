"""What protects the updates of a federated run, checked before anything runs:
user-level differential privacy of the rounds (`privacy.federated`) and SecAgg+
secure aggregation (`federated.secagg`). The runtime applies both with Flower's own
wrappers, mods and workflow; here are only the rules and the numbers they need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cotune.config import Config
from cotune.errors import ConfigError
from cotune.methods.sampling import sample_size
from cotune.methods.spec import FederatedSpec, MethodSpec
from cotune.privacy.rounds import RoundsBudget


@dataclass(frozen=True)
class SecAggPlan:
    """SecAgg+ for every round: `sampled` clients, each secret split into `shares`
    (one per neighbour, itself included), rebuilt from `threshold` of them; update
    values clipped to [-clip_range, clip_range] before quantisation."""

    sampled: int
    shares: int
    threshold: int
    clip_range: float


def _sampled(cfg: Config) -> int:
    return sample_size(cfg.federated.clients, cfg.federated.fraction)


def _ranked(cfg: Config) -> bool:
    fed = cfg.federated
    return fed.client_ranks is not None or any(d.rank is not None for d in fed.devices)


def secagg_plan(cfg: Config) -> SecAggPlan | None:
    """The SecAgg+ parameters of `cfg` (None without `federated.secagg`); a
    `ConfigError` when a round cannot run it."""
    fed = cfg.federated
    if not fed.secagg:
        return None
    m = _sampled(cfg)
    per_round = (
        f"federated.clients = {fed.clients} with fraction = {fed.fraction} samples {m} "
        "client(s) per round"
    )
    if m < 3:
        raise ConfigError(
            f"federated.secagg needs at least 3 clients in every round (a masked sum of "
            f"fewer reveals each update to the others), but {per_round}: raise "
            "federated.clients or federated.fraction, or drop federated.secagg"
        )
    shares = fed.secagg_shares if fed.secagg_shares is not None else m
    if shares < 3:
        raise ConfigError(
            f"federated.secagg_shares = {shares}: a client's secrets need at least 3 shares "
            f"(itself and two neighbours); set 3..{m} or leave it unset (all {m} clients)"
        )
    if shares > m:
        raise ConfigError(
            f"federated.secagg_shares = {shares} exceeds the clients of a round: {per_round}; "
            f"set secagg_shares to at most {m} (or leave it unset: all of them)"
        )
    threshold = fed.secagg_threshold if fed.secagg_threshold is not None else shares // 2 + 1
    if threshold < 2 or threshold > m - 1 or threshold >= shares:
        raise ConfigError(
            f"federated.secagg_threshold = {threshold} must be at least 2 and below both "
            f"the clients per round and the shares (federated.secagg_shares = {shares}), so "
            f"that one client may drop: {per_round}; valid thresholds here are "
            f"2..{min(m, shares) - 1}, or raise federated.clients / federated.fraction"
        )
    return SecAggPlan(m, shares, threshold, fed.secagg_clip_range)


def rounds_budget(cfg: Config) -> RoundsBudget | None:
    """The noise of `cfg`'s rounds (None without `privacy.federated`), from the target
    epsilon at delta over `federated.rounds` rounds at rate sampled / clients."""
    p, fed = cfg.privacy, cfg.federated
    if p.federated is None or p.epsilon is None:
        return None
    return RoundsBudget.plan(
        p.epsilon, p.delta, p.clip, fed.clients, _sampled(cfg), fed.rounds, p.accountant,
        p.federated,
    )  # fmt: skip


def check_protection(cfg: Config, spec: MethodSpec, capable: Callable[[str], list[str]]) -> None:
    """The method first (so the message names the real problem), then the settings:
    a `ConfigError` saying what is wrong and what would be valid. `capable(flag)` lists
    the methods whose `FederatedSpec` has `flag` (for the messages)."""
    runs = spec.runs
    fed_spec = runs if isinstance(runs, FederatedSpec) else None
    p = cfg.privacy
    if cfg.federated.secagg and (fed_spec is None or not fed_spec.secure_aggregation):
        raise ConfigError(
            f"federated.secagg (SecAgg+) is not supported by method {cfg.method!r}: it "
            f"needs a method whose server only sums the clients' updates "
            f"({', '.join(capable('secure_aggregation'))}); drop federated.secagg or change the method"
        )
    if p.federated is not None and (fed_spec is None or not fed_spec.differential_privacy):
        cut = " (split and splitfed noise the cut: [privacy] without federated)"
        raise ConfigError(
            f"privacy.federated = {p.federated!r} (differential privacy of federated rounds) "
            f"is not supported by method {cfg.method!r}; methods that support it: "
            f"{', '.join(capable('differential_privacy'))}{cut if cfg.method in ('split', 'splitfed') else ''}"
        )
    if fed_spec is None or not fed_spec.differential_privacy:
        return
    if p.epsilon is not None and p.federated is None:
        raise ConfigError(
            f"privacy.epsilon = {p.epsilon} with method {cfg.method!r} needs "
            "privacy.federated = 'server' (updates clipped on the server) or 'client' "
            "(clipped on each client before sending): say where, or remove privacy.epsilon"
        )
    if p.federated is not None and p.epsilon is None:
        raise ConfigError(
            f"privacy.federated = {p.federated!r} needs a target privacy.epsilon (> 0, e.g. "
            "8.0) to set the noise from"
        )
    if p.federated is not None and cfg.federated.secagg:
        raise ConfigError(
            "privacy.federated together with federated.secagg is not supported yet (the "
            "noise would have to be added by the clients under the masks): use one of them"
        )
    if (p.federated is not None or cfg.federated.secagg) and _ranked(cfg):
        what = "privacy.federated" if p.federated is not None else "federated.secagg"
        raise ConfigError(
            f"{what} with per-device LoRA ranks (federated.client_ranks or ranks in the "
            "fleet) is not supported: the updates must all have one shape; drop the ranks"
        )
    secagg_plan(cfg)
    # the noise itself (`rounds_budget`, seconds of Opacus's search) is planned once,
    # by the server before its first round: not every time a config is resolved
