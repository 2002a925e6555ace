"""`fedlora`: federated LoRA. Clients train LoRA adapters (and the head) on their own
data; the server averages only those, weighted by examples. Far fewer bytes per round
than fedavg; the frozen base never travels.

LoRA defaults to r = 8 on the family's default target modules when `model.lora` is not
given.

Devices of different LoRA ranks (`federated.client_ranks = [4, 8, 16]`, or a fleet of
`federated.devices` with a `rank` each; client k is entry k mod the list's length)
follow HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", 2024) without its rank self-pruning:

- the global adapter has the fleet's largest rank R (`model.lora.r` is set to R): it
  is what the server holds, checkpoints and scores, an ordinary rank-R LoRA model;
- a device of rank r receives the first r components of it (rows of every LoRA A,
  columns of every LoRA B: `aggregation.truncate_rank`), trains them and sends them
  back; both ways travel only its rank's factors;
- the server zero-pads every update to rank R and takes the example-weighted average
  (`aggregation.rank_average`, rule `federated.rank_aggregation = "zero_pad"`), or
  averages each rank component over the devices that hold it (`"rank_wise"`);
- every device scales its adapter by alpha / R (its peft `lora_alpha` is
  alpha x r / R), so a component means the same update on every device and in the
  global model, and a device's adapter is exactly the first r terms of the global one.

With one rank for every device this is plain fedlora, bit for bit. docs/federated.md
says why HetLoRA rather than FlexLoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

from cotune.config import Config
from cotune.config.schema import LoraConfig
from cotune.errors import ConfigError
from cotune.methods.federated.aggregation import rank_average, state_rank, truncate_rank
from cotune.methods.federated.client import check_partition, local_evaluate, local_train
from cotune.methods.federated.global_model import GlobalModel
from cotune.methods.spec import (
    AcceptedUpdate,
    ClientUpdate,
    FederatedSpec,
    MethodSpec,
    ServerHook,
    State,
)


def device_ranks(cfg: Config) -> list[int] | None:
    """Each client's LoRA rank (index: partition id), or None when the fleet has no
    per-device ranks (every client uses `model.lora.r`)."""
    fed = cfg.federated
    if fed.client_ranks is not None:
        listed = list(fed.client_ranks)
    else:
        listed = [d.rank for d in fed.devices if d.rank is not None]
        if not listed or len(listed) < len(fed.devices):
            return None
    return [listed[k % len(listed)] for k in range(fed.clients)]


def heterogeneous(cfg: Config) -> bool:
    ranks = device_ranks(cfg)
    return ranks is not None and len(set(ranks)) > 1


def configure(cfg: Config) -> None:
    if cfg.model.lora is None:
        cfg.model.lora = LoraConfig()
    ranks = device_ranks(cfg)
    if ranks is None:
        return
    top = max(ranks)
    lora = cfg.model.lora
    if "r" in lora.model_fields_set and lora.r != top:
        raise ConfigError(
            f"model.lora.r = {lora.r}, but with per-device ranks the global adapter has "
            f"the largest device rank, {top} (federated ranks {sorted(set(ranks))}): drop "
            f"model.lora.r or set it to {top}"
        )
    lora.r = top


def device_config(cfg: Config, partition: int) -> Config:
    """The config client `partition` trains with: its own LoRA rank r, scaled like the
    global adapter (peft's scale is lora_alpha / r, so lora_alpha = alpha x r / R)."""
    ranks = device_ranks(cfg)
    lora = cfg.model.lora
    if ranks is None or lora is None or ranks[partition] == lora.r:
        return cfg
    r = ranks[partition]
    own = lora.model_copy(update={"r": r, "alpha": lora.alpha * r / lora.r})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"lora": own})})


def client_train(
    cfg: Config,
    partition_id: int,
    global_state: State,
    server_round: int,
    extras: dict[str, State] | None = None,
) -> ClientUpdate:
    """`local_train` on the device's own rank (the global state arrives cut to it)."""
    check_partition(cfg, partition_id)
    own = device_config(cfg, partition_id)
    return local_train(own, partition_id, global_state, server_round, extras)


class RankHook(ServerHook):
    """The server half of fedlora with per-device ranks: cut the global adapter to each
    device's rank on the way out, zero-pad and average the updates on the way in."""

    def __init__(self, cfg: Config, global_model: GlobalModel) -> None:
        ranks = device_ranks(cfg)
        if ranks is None:
            raise ValueError("RankHook needs per-device ranks (federated.client_ranks)")
        self.ranks = ranks
        self.rule = cfg.federated.rank_aggregation
        held = state_rank(global_model.state())
        if held != max(ranks):
            raise ValueError(f"the global adapter has rank {held}, expected {max(ranks)}")

    def state_for(self, partition: int, server_round: int, state: State) -> State:
        rank = self.ranks[partition]
        return state if rank == state_rank(state) else truncate_rank(state, rank)

    def aggregate(
        self, server_round: int, updates: Sequence[AcceptedUpdate], global_state: State
    ) -> State:
        return rank_average(
            [u.state for u in updates], [u.weight for u in updates], global_state, self.rule
        )


def server_hook(cfg: Config, global_model: GlobalModel) -> ServerHook:
    return RankHook(cfg, global_model) if heterogeneous(cfg) else ServerHook()


SPEC = MethodSpec(
    name="fedlora",
    summary="federated LoRA: clients train adapters, the server averages them",
    runs=FederatedSpec(
        client_train=client_train,
        server_hook=server_hook,
        device_ranks=True,
        client_evaluate=local_evaluate,
        differential_privacy=True,
        secure_aggregation=True,
    ),
    reads=frozenset({"generation", "federated", "link", "memory", "privacy", "runtime"}),
    configure=configure,
)
