"""The official SQuAD v1.1 evaluation: exact match and token F1 over normalised answers.

As in the official `evaluate-v1.1.py`: an answer is normalised (lower case, punctuation
removed, the articles a/an/the removed, whitespace collapsed); a prediction scores the
best exact match and the best token F1 over its example's ground truths; both are
averaged over examples and reported x100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

METRIC_KEYS = ("exact_match", "f1")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """F1 of the normalised tokens' multiset overlap (0 when nothing is shared)."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def example_scores(prediction: str, truths: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over its ground truths, in [0, 1]."""
    if not truths:
        raise ValueError("a SQuAD example needs at least one ground-truth answer")
    em = max(exact_match(prediction, t) for t in truths)
    f1 = max(token_f1(prediction, t) for t in truths)
    return em, f1


def squad_scores(predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"}: the means over examples, x100 (as the official script)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} examples")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    pairs = [example_scores(p, t) for p, t in zip(predictions, truths, strict=True)]
    n = len(pairs)
    return {
        "exact_match": 100.0 * sum(em for em, _ in pairs) / n,
        "f1": 100.0 * sum(f1 for _, f1 in pairs) / n,
    }
