"""From start/end logits of QA features to one answer text per example.

For each example, over all of its features (windows): the `n_best` highest start and
end logits; a span (start, end) is valid when both tokens are context tokens, end >=
start and it is at most `max_answer_len` tokens long; the best valid span by start +
end logit gives the answer, cut from the context by the tokens' character offsets. An
example with no valid span answers "".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BEST = 20
MAX_ANSWER_LEN = 30


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    n_best: int = N_BEST,
    max_answer_len: int = MAX_ANSWER_LEN,
) -> tuple[float, int, int] | None:
    """(score, start char, end char) of the best valid span of one feature, or None."""
    n = min(len(start_logits), len(offsets))
    starts = np.argsort(start_logits[:n])[::-1][:n_best]
    ends = np.argsort(end_logits[:n])[::-1][:n_best]
    best: tuple[float, int, int] | None = None
    for s in starts:
        if offsets[s, 0] < 0:
            continue
        for e in ends:
            if offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_len:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(offsets[s, 0]), int(offsets[e, 1]))
    return best


def predict_answers(
    contexts: Sequence[str],
    example_index: Sequence[int],
    offsets: Sequence[np.ndarray],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    *,
    n_best: int = N_BEST,
    max_answer_len: int = MAX_ANSWER_LEN,
) -> list[str]:
    """One answer text per context (example), from its features' logits."""
    best: list[tuple[float, int, int] | None] = [None] * len(contexts)
    for k, i in enumerate(example_index):
        span = best_span(start_logits[k], end_logits[k], offsets[k], n_best, max_answer_len)
        current = best[i]
        if span is not None and (current is None or span[0] > current[0]):
            best[i] = span
    return ["" if b is None else contexts[i][b[1] : b[2]] for i, b in enumerate(best)]
