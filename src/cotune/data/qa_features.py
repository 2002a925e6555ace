"""Extractive QA examples -> model features: question + context windows.

Each question is tokenised with its context (`truncation="only_second"`); a context
longer than the window is cut into several overlapping windows (`stride` tokens shared
by successive windows), each one feature. A feature's label is the (start, end) token
positions of the answer's first ground truth, or (0, 0) (the CLS token) when the answer
is not wholly inside that window. Every feature also keeps its example's index and the
character offsets of its context tokens (-1 elsewhere), from which post-processing maps
token spans back to answer text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cotune.data.aside import aside
from cotune.data.encode import ENCODE_BATCH, EncodedDataset, token_array
from cotune.data.squad import QAExample
from cotune.data.task import Example
from cotune.errors import DataError

NO_ANSWER = (0, 0)


class QAFeatures(EncodedDataset):
    """Features (item i: {"input_ids", ["token_type_ids"], "labels": (start, end)}), and
    per feature the index of its example and its context tokens' character offsets
    (an int32 array of shape (tokens, 2), -1 outside the context)."""

    def __init__(
        self, items: list[dict[str, Any]], example_index: list[int], offsets: list[np.ndarray]
    ) -> None:
        super().__init__(items)
        self.example_index = example_index
        self.offsets = offsets

    def subset(self, indices: Sequence[int]) -> QAFeatures:
        return QAFeatures(
            [self.items[i] for i in indices],
            [self.example_index[i] for i in indices],
            [self.offsets[i] for i in indices],
        )


def default_stride(max_len: int) -> int:
    """128 tokens shared between windows, at most half the window."""
    return min(128, max_len // 2)


def _question_lengths(examples: Sequence[Example], tokenizer: Any) -> list[int]:
    ids = tokenizer([ex.text_a for ex in examples], add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def _window_room(examples: Sequence[Example], tokenizer: Any, max_len: int) -> list[int]:
    """Context tokens that fit in a window next to each question; a question that
    leaves no room is a DataError suggesting a larger `train.max_seq_len`."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    rooms = [max_len - n - specials for n in _question_lengths(examples, tokenizer)]
    for ex, room in zip(examples, rooms, strict=True):
        if room < 2:
            need = max_len - room + 2
            raise DataError(
                f"the question {ex.text_a[:80]!r} takes {max_len - room - specials} tokens, "
                f"which leaves no room for its context in train.max_seq_len = {max_len}; "
                f"set train.max_seq_len to at least {need} (384 is usual for SQuAD)"
            )
    return rooms


def answer_tokens(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """(start, end) token positions of the characters [start_char, end_char) among the
    context tokens of `offsets` (-1 outside the context), or `NO_ANSWER` when the
    answer is not wholly inside them."""
    ctx = np.flatnonzero(offsets[:, 0] >= 0)
    if len(ctx) == 0:
        return NO_ANSWER
    if offsets[ctx[0], 0] > start_char or offsets[ctx[-1], 1] < end_char:
        return NO_ANSWER
    starts = ctx[offsets[ctx, 0] <= start_char]
    ends = ctx[offsets[ctx, 1] >= end_char]
    return int(starts[-1]), int(ends[0])


def _context_offsets(enc: Any, row: int) -> np.ndarray:
    seq = enc.sequence_ids(row)
    offs = np.asarray(enc["offset_mapping"][row], dtype=np.int32).reshape(-1, 2)
    outside = np.asarray([s != 1 for s in seq], dtype=bool)
    offs[outside] = -1
    return offs


@aside
def encode_qa(
    examples: Sequence[Example], tokenizer: Any, max_len: int, stride: int | None = None
) -> QAFeatures:
    """Features of `examples` (`QAExample`s): windows of `max_len` tokens sharing
    `stride` tokens (default `default_stride`; reduced for a question that leaves less
    room), unpadded; on a helper thread (`cotune.data.aside`)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("extractive QA needs a fast tokenizer (for character offsets)")
    stride = default_stride(max_len) if stride is None else stride
    rooms = _window_room(examples, tokenizer, max_len)
    items: list[dict[str, Any]] = []
    example_index: list[int] = []
    offsets: list[np.ndarray] = []
    for start in range(0, len(examples), ENCODE_BATCH):
        chunk = range(start, min(start + ENCODE_BATCH, len(examples)))
        # one tokenizer call per stride (the stride must leave room in every window)
        by_stride: dict[int, list[int]] = {}
        for i in chunk:
            by_stride.setdefault(min(stride, rooms[i] - 1), []).append(i)
        for s, group in sorted(by_stride.items()):
            enc = tokenizer(
                [examples[i].text_a for i in group],
                [examples[i].text_b or "" for i in group],
                truncation="only_second",
                max_length=max_len,
                stride=s,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
            for row, j in enumerate(enc["overflow_to_sample_mapping"]):
                i = group[j]
                offs = _context_offsets(enc, row)
                ex = examples[i]
                label = NO_ANSWER
                if isinstance(ex, QAExample) and ex.answers:
                    a0 = ex.answer_starts[0]
                    label = answer_tokens(offs, a0, a0 + len(ex.answers[0]))
                item: dict[str, Any] = {"input_ids": token_array(enc["input_ids"][row]),
                                        "labels": label}  # fmt: skip
                if "token_type_ids" in enc:
                    item["token_type_ids"] = token_array(enc["token_type_ids"][row])
                items.append(item)
                example_index.append(i)
                offsets.append(offs)
    order = sorted(range(len(items)), key=lambda k: example_index[k])  # stable: windows in order
    return QAFeatures(
        [items[k] for k in order], [example_index[k] for k in order], [offsets[k] for k in order]
    )
