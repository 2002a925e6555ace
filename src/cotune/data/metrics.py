"""Task metrics with scikit-learn and scipy (HF `evaluate` cannot load offline).

scikit-learn and scipy.stats are imported at the first score that needs them, not with
this module: a device process that trains without evaluating never loads them (about 40
and 20 MiB of RSS).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

METRIC_KEYS = ("accuracy", "accuracy_mm", "f1", "mcc", "pearson", "spearman")


def _accuracy(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, preds))


def _f1(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    # Binary tasks (MRPC, QQP): F1 of the positive class 1, as GLUE reports it.
    # More classes: macro F1 over all label indices.
    from sklearn.metrics import f1_score

    if num_labels == 2:
        return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))
    return float(
        f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)
    )


def _mcc(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def _correlation(name: str) -> Callable[[np.ndarray, np.ndarray, int], float]:
    def metric(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
        if len(preds) < 2:
            return float("nan")
        from scipy import stats

        fn = getattr(stats, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input: the result is nan, said once here
            return float(fn(preds, labels)[0])

    return metric


_FNS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "accuracy": _accuracy,
    "accuracy_mm": _accuracy,  # MNLI mismatched: accuracy under its own key
    "f1": _f1,
    "mcc": _mcc,
    "pearson": _correlation("pearsonr"),
    "spearman": _correlation("spearmanr"),
}


def compute(
    keys: Sequence[str],
    preds: np.ndarray,
    labels: np.ndarray,
    kind: str,
    num_labels: int,
) -> dict[str, float]:
    """Compute the metrics named in `keys` for one evaluation split."""
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if kind in ("classification", "image-classification"):
        if preds.ndim == 2:  # logits or probabilities
            preds = preds.argmax(axis=-1)
        preds = preds.astype(np.int64).reshape(-1)
        labels = labels.astype(np.int64).reshape(-1)
    else:
        preds = preds.astype(np.float64).reshape(-1)
        labels = labels.astype(np.float64).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no examples to compute metrics on")
    unknown = [k for k in keys if k not in _FNS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {', '.join(METRIC_KEYS)}")
    return {k: _FNS[k](preds, labels, num_labels) for k in keys}
