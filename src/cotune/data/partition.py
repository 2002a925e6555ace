"""Splitting a training set across federated clients: iid, dirichlet, shards."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cotune.data.sampling import rng_for
from cotune.errors import ConfigError, DataError

SCHEMES = ("iid", "dirichlet", "shards")
REGRESSION_STRATA = 5  # float labels are cut into this many quantile bins to act as classes
DIRICHLET_TRIES = 100


def _as_classes(labels: Sequence[int | float]) -> np.ndarray:
    """Integer classes; non-integral (regression) labels become quantile strata."""
    arr = np.asarray(labels, dtype=np.float64)
    if np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    edges = np.quantile(arr, np.linspace(0, 1, REGRESSION_STRATA + 1)[1:-1])
    return np.searchsorted(edges, arr, side="right").astype(np.int64)


def _iid(n: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), n_clients)


def _dirichlet_once(
    classes: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    clients: list[list[int]] = [[] for _ in range(n_clients)]
    for label in np.unique(classes):
        idx = rng.permutation(np.flatnonzero(classes == label))
        shares = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for client, part in enumerate(np.split(idx, cuts)):
            clients[client].extend(part.tolist())
    return clients


def _dirichlet(
    classes: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """Each class is spread over clients by proportions drawn from Dir(alpha).

    Small alpha gives each client few classes (strong label skew); large alpha tends to
    iid. A draw that leaves a client empty is redrawn; if that keeps happening, empty
    clients take one example each from the largest clients.
    """
    for _ in range(DIRICHLET_TRIES):
        clients = _dirichlet_once(classes, n_clients, alpha, rng)
        if all(clients):
            return clients
    for client in clients:
        if not client:
            donor = max(clients, key=len)
            client.append(donor.pop(int(rng.integers(len(donor)))))
    return clients


def _shards(
    classes: np.ndarray, n_clients: int, per_client: int, rng: np.random.Generator
) -> list[list[int]]:
    """Sort by label, cut into n_clients * per_client shards, deal per_client to each."""
    n_shards = n_clients * per_client
    if len(classes) < n_shards:
        raise DataError(
            f"shards partition needs at least clients * shards_per_client = {n_shards} "
            f"examples, got {len(classes)}; lower federated.clients or "
            "federated.shards_per_client, or use partition = 'iid'"
        )
    shuffled = rng.permutation(len(classes))  # random order within each label
    by_label = shuffled[np.argsort(classes[shuffled], kind="stable")]
    shards = np.array_split(by_label, n_shards)
    order = rng.permutation(n_shards)
    return [
        np.concatenate([shards[s] for s in order[c * per_client : (c + 1) * per_client]]).tolist()
        for c in range(n_clients)
    ]


def partition(
    labels: Sequence[int],
    n_clients: int,
    scheme: str = "iid",
    alpha: float = 1.0,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[list[int]]:
    """Example indices per client: every example in exactly one client, none empty.

    The same arguments and seed always give the same partition. Float labels
    (regression) are grouped into quantile strata for the label-skewed schemes.
    """
    if scheme not in SCHEMES:
        raise ConfigError(
            f"federated.partition {scheme!r} is not a partition scheme; valid: {', '.join(SCHEMES)}"
        )
    if n_clients < 1:
        raise ConfigError(f"federated.clients must be at least 1, got {n_clients}")
    if alpha <= 0:
        raise ConfigError(f"federated.alpha must be greater than 0, got {alpha}")
    if shards_per_client < 1:
        raise ConfigError(
            f"federated.shards_per_client must be at least 1, got {shards_per_client}"
        )
    n = len(labels)
    if n_clients > n:
        raise DataError(
            f"cannot give {n_clients} clients at least one example each from {n} training "
            f"examples; use at most {n} clients or more data (task.max_train_examples)"
        )
    rng = rng_for(seed, f"partition/{scheme}")
    if scheme == "iid":
        parts = [p.tolist() for p in _iid(n, n_clients, rng)]
    elif scheme == "dirichlet":
        parts = _dirichlet(_as_classes(labels), n_clients, alpha, rng)
    else:
        parts = _shards(_as_classes(labels), n_clients, shards_per_client, rng)
    return [sorted(int(i) for i in part) for part in parts]
