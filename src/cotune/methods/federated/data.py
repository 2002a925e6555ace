"""Who holds which training examples in a federated run.

`federated.client_data` says where a client's examples come from:

- "partition": every party (server, each client) derives the same split from the
  config and seed, so no index list ever travels: the server keeps a public share
  (what the method's `FederatedSpec.public_fraction` says: fedkd's
  `kd.public_fraction`, none for the other methods) and the rest is partitioned across
  `federated.clients` by `cotune.data.partition`;
- "node": a client's config names its own data (the runtime points `cfg.task` at the
  node's data path, `cotune.data.registry.with_data_path`) and it trains on all of it
  (`load_task(part="train")`); the server loads the task's evaluation data alone
  (`part="eval"`) and never opens a training file.

`client_task` / `client_examples` are what a client trains on, `server_task` what the
server builds and scores its global model with.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cotune.config import Config
from cotune.data import Example, Task, load_task, partition
from cotune.data.registry import Part
from cotune.data.sampling import rng_for


@dataclass(frozen=True)
class FederatedSplit:
    """Indices into `task.train`: the server's public share and one list per client."""

    public: list[int]
    clients: list[list[int]]

    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


def public_fraction(cfg: Config) -> float:
    """The share the server keeps, as the method declares it (fedkd's teacher data)."""
    from cotune.methods.registry import get_spec
    from cotune.methods.spec import FederatedSpec

    runs = get_spec(cfg.method).runs
    return runs.public_fraction(cfg) if isinstance(runs, FederatedSpec) else 0.0


def split_train(labels: list[int | float], cfg: Config) -> FederatedSplit:
    """The seeded public share and the client partitions of `len(labels)` examples."""
    n = len(labels)
    order = rng_for(cfg.seed, "federated/public").permutation(n)
    n_public = int(round(public_fraction(cfg) * n))
    public = sorted(int(i) for i in order[:n_public])
    rest = np.sort(order[n_public:])
    fed = cfg.federated
    parts = partition(
        [labels[i] for i in rest],
        fed.clients,
        scheme=fed.partition,
        alpha=fed.alpha,
        shards_per_client=fed.shards_per_client,
        seed=cfg.seed,
    )
    return FederatedSplit(public=public, clients=[[int(rest[j]) for j in p] for p in parts])


@lru_cache(maxsize=4)
def _cached_task(task_json: str, seed: int, part: Part = "all") -> Task:
    from cotune.config.schema import TaskConfig

    return load_task(TaskConfig.model_validate_json(task_json), seed, part=part)


def task_for(cfg: Config) -> Task:
    """The task, loaded once per process (clients serve many rounds)."""
    return _cached_task(cfg.task.model_dump_json(), cfg.seed)


def own_data(cfg: Config) -> bool:
    """Whether each client brings its own data (`federated.client_data = "node"`)."""
    return cfg.federated.client_data == "node"


def client_task(cfg: Config) -> Task:
    """The task as a client sees it: the whole task (its partition is cut from the
    training examples), or with its own data only that data, all for training."""
    if own_data(cfg):
        return _cached_task(cfg.task.model_dump_json(), cfg.seed, "train")
    return task_for(cfg)


def server_task(cfg: Config) -> Task:
    """The task as the server sees it: the whole task, or when the clients bring their
    own data the evaluation data alone (possibly none: `task.eval` empty)."""
    if own_data(cfg):
        return _cached_task(cfg.task.model_dump_json(), cfg.seed, "eval")
    return task_for(cfg)


def client_examples(cfg: Config, partition_id: int) -> list[Example]:
    """The examples client `partition_id` trains on: its partition, or all its own."""
    task = client_task(cfg)
    if own_data(cfg):
        return task.train
    return [task.train[i] for i in split_for(cfg).clients[partition_id]]


@lru_cache(maxsize=4)
def _cached_split(cfg_json: str) -> FederatedSplit:
    cfg = Config.model_validate_json(cfg_json)
    return split_train([ex.label for ex in task_for(cfg).train], cfg)


def split_for(cfg: Config) -> FederatedSplit:
    """`split_train` on the task's training labels, cached per process. Clients with
    their own data hold no share of the server's: no public share, no partitions."""
    if own_data(cfg):
        return FederatedSplit(public=[], clients=[])
    return _cached_split(cfg.model_dump_json())
