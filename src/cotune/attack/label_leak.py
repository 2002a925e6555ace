"""What the cloud of a split run learns about the device's labels.

- `split.labels = "cloud"` (the default): the labels cross with every training batch;
  the cloud holds all of them (recovery 100%, nothing to attack).
- `split.labels = "device"` (U-shaped): the head and the loss stay on the device, but
  the cloud receives, for every training example, the gradient of the loss with
  respect to the pooled features it sent down. For a softmax head that gradient is
  `J^T (p - onehot(y))`: its direction is set mostly by the label. The attack here
  is the direction (cosine) attack of Li et al. 2022 ("Label leakage and protection in
  two-party split learning") in its unsupervised form: project every example's
  gradient on the dominant direction of all the gradients the cloud has seen (their
  first principal component, uncentered, after normalising each to unit length) and
  split by sign (two labels); with more labels, k-means on the normalised gradients.
  Clusters are named by one piece of side knowledge, the label prior: the largest
  cluster gets the most frequent label (a public fact for most tasks), and so on.

`gradient_label_attack` is the attack; `label_leak_report` scores it on what a run's
cloud received (`cotune.runtime.curious_cloud` runs a real U-shaped split run and
records, for every training step, the gradient its cloud decodes and the batch's
labels).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from cotune.errors import ConfigError


def _unit(grads: torch.Tensor) -> torch.Tensor:
    g = grads.float().reshape(grads.shape[0], -1)
    return g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50) -> torch.Tensor:
    """Spherical k-means (cosine), k-means++ seeding; the cluster of every row."""
    g = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(0, x.shape[0], (1,), generator=g))]]
    for _ in range(1, k):
        d = 1 - (x @ torch.stack(centres).T).max(dim=1).values
        p = d.clamp(min=0) ** 2
        idx = int(torch.multinomial(p / p.sum(), 1, generator=g)) if p.sum() > 0 else 0
        centres.append(x[idx])
    c = torch.stack(centres)
    assign = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=1)
        for j in range(k):
            members = x[assign == j]
            if members.shape[0]:
                m = members.sum(0)
                c[j] = m / m.norm().clamp(min=1e-12)
    return assign


def gradient_label_attack(
    grads: torch.Tensor, num_labels: int, prior: Sequence[int], *, seed: int = 0
) -> torch.Tensor:
    """The label the cloud infers for every example from its gradient `grads` [N, H]:
    clusters of gradient directions (sign of the projection on the first principal
    component for two labels; spherical k-means otherwise), named by `prior`, the
    labels from most to least frequent (largest cluster -> prior[0], ...)."""
    if num_labels < 2:
        raise ConfigError("the label attack needs a classification task (2+ labels)")
    x = _unit(grads)
    if num_labels == 2:
        # uncentered: the two labels' gradients point in opposite directions
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        clusters = (x @ v[0] > 0).long()
    else:
        clusters = _kmeans(x, num_labels, seed)
    by_size = [c for c, _ in Counter(clusters.tolist()).most_common()]
    names = {c: int(prior[i]) if i < len(prior) else int(prior[-1]) for i, c in enumerate(by_size)}
    return torch.tensor([names[int(c)] for c in clusters], dtype=torch.long)


def label_leak_report(
    grads: torch.Tensor, labels: torch.Tensor, *, seed: int = 0
) -> dict[str, Any]:
    """What a U-shaped run's cloud learns about the labels from the gradients `grads`
    [N, H] it received (one row per training example) and the true `labels` [N] (for
    scoring only; the attacker uses nothing but their frequency order)."""
    if grads.shape[0] != labels.shape[0] or grads.shape[0] == 0:
        raise ValueError(
            f"{grads.shape[0]} gradient rows for {labels.shape[0]} labels: not a per-sequence "
            "head's gradient, one row per example"
        )
    labels = labels.long()
    counts = Counter(labels.tolist())
    num_labels = max(int(labels.max()) + 1, 2)
    prior = [y for y, _ in counts.most_common()]  # the side knowledge: frequency order
    guess = gradient_label_attack(grads, num_labels, prior, seed=seed)
    return {
        "labels": "device",
        "attack": "gradient direction (sign of the first principal component; k-means "
        "for 3+ labels), clusters named by the label prior",
        "examples": int(labels.shape[0]),
        "gradient_width": int(grads.shape[1]),
        "label_recovery": float((guess == labels).float().mean()),
        "floor_majority": counts.most_common(1)[0][1] / labels.shape[0],
    }


LABELS_CROSS = {"labels": "cloud", "label_recovery": 1.0, "attack": "none: the labels cross",
                "floor_majority": None}  # fmt: skip
"""`split.labels = "cloud"`: the cloud receives every training label."""
