"""Federated partitioners: coverage, label skew, determinism, impossible requests."""

from __future__ import annotations

import numpy as np
import pytest

from cotune.data import partition
from cotune.errors import ConfigError, DataError

LABELS = [i % 5 for i in range(1000)]  # 5 balanced classes
SCHEMES = ["iid", "dirichlet", "shards"]


def mean_tv(parts: list[list[int]], labels: list[int]) -> float:
    """Mean total-variation distance between client label distributions and the global one."""
    labels_arr = np.asarray(labels)
    k = labels_arr.max() + 1
    glob = np.bincount(labels_arr, minlength=k) / len(labels_arr)
    tvs = [
        0.5 * np.abs(np.bincount(labels_arr[p], minlength=k) / len(p) - glob).sum() for p in parts
    ]
    return float(np.mean(tvs))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_example_in_exactly_one_client(scheme):
    parts = partition(LABELS, 10, scheme=scheme, alpha=0.1, seed=3)
    assert len(parts) == 10
    assert all(len(p) > 0 for p in parts)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(LABELS)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_seeded(scheme):
    a = partition(LABELS, 8, scheme=scheme, alpha=0.5, seed=7)
    assert partition(LABELS, 8, scheme=scheme, alpha=0.5, seed=7) == a
    assert partition(LABELS, 8, scheme=scheme, alpha=0.5, seed=8) != a


def test_dirichlet_small_alpha_skews_labels():
    iid = mean_tv(partition(LABELS, 10, "iid", seed=0), LABELS)
    skewed = mean_tv(partition(LABELS, 10, "dirichlet", alpha=0.1, seed=0), LABELS)
    mild = mean_tv(partition(LABELS, 10, "dirichlet", alpha=100.0, seed=0), LABELS)
    assert iid < 0.1
    assert skewed > 0.4
    assert skewed > 4 * iid
    assert mild < 0.15


def test_iid_sizes_balanced():
    sizes = [len(p) for p in partition(LABELS, 7, "iid", seed=1)]
    assert max(sizes) - min(sizes) <= 1


def test_shards_give_few_labels_per_client():
    parts = partition(LABELS, 10, "shards", shards_per_client=2, seed=0)
    # 20 shards of 50 from label-sorted data: every shard holds one label
    assert all(len(set(np.asarray(LABELS)[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)
    assert mean_tv(parts, LABELS) > 0.5


def test_dirichlet_never_leaves_a_client_empty():
    labels = [i % 3 for i in range(40)]
    parts = partition(labels, 30, "dirichlet", alpha=0.01, seed=0)
    assert all(parts) and sorted(i for p in parts for i in p) == list(range(40))


def test_regression_labels_are_stratified():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 5, size=300).tolist()
    parts = partition(scores, 6, "dirichlet", alpha=0.1, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(300))
    assert all(parts)


def test_more_clients_than_examples():
    with pytest.raises(DataError, match="5 clients"):
        partition([0, 1, 0], 5)


def test_too_few_examples_for_shards():
    with pytest.raises(DataError, match="shards_per_client"):
        partition([0, 1] * 5, 4, "shards", shards_per_client=3)


def test_unknown_scheme():
    with pytest.raises(ConfigError, match="iid, dirichlet, shards"):
        partition(LABELS, 4, "by-label")
