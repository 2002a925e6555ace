"""Tokenising examples once, dynamic padding per batch, and seeded loaders."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cotune.data.aside import aside
from cotune.data.task import Example

ENCODE_BATCH = 1000  # examples per tokenizer call


def token_array(ids: Iterable[int]) -> array[int]:
    """Token ids held compactly: 4 bytes per id, where a list holds an 8-byte pointer
    per id and a 28-byte int object per id above 256 (SST-2's 67k training phrases: about
    3 MB instead of about 30 MB on the device)."""
    return array("i", ids)


def long_tensor(ids: Sequence[int]) -> torch.Tensor:
    """`ids` (a `token_array` or a list) as a LongTensor."""
    if isinstance(ids, array) and len(ids):
        return torch.frombuffer(ids, dtype=torch.int32).long()
    return torch.as_tensor(list(ids), dtype=torch.long)


class EncodedDataset(Dataset):
    """Tokenised examples: item i is {"input_ids", ["token_type_ids"], "labels"}.

    Sequences are truncated but not padded (`PadCollator` pads each batch) and held as
    `token_array`s.
    """

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    @property
    def labels(self) -> list[int | float]:
        return [item["labels"] for item in self.items]

    def subset(self, indices: Sequence[int]) -> EncodedDataset:
        """The examples at `indices` (e.g. one client's partition) as a dataset."""
        return EncodedDataset([self.items[i] for i in indices])


def _tokenize(tokenizer: Any, examples: list[Example], max_len: int) -> dict[str, list]:
    texts_a = [ex.text_a for ex in examples]
    if examples[0].text_b is None:
        return tokenizer(texts_a, truncation=True, max_length=max_len)
    texts_b = [ex.text_b for ex in examples]
    return tokenizer(texts_a, texts_b, truncation=True, max_length=max_len)


@aside
def encode(examples: list[Example], tokenizer: Any, max_len: int) -> EncodedDataset:
    """Tokenise `examples` in batches (truncated to `max_len`, no padding), on a helper
    thread (`cotune.data.aside`: the tokenizer's transient memory stays off the training
    heap)."""
    items: list[dict[str, Any]] = [{} for _ in examples]
    for start in range(0, len(examples), ENCODE_BATCH):
        chunk = range(start, min(start + ENCODE_BATCH, len(examples)))
        # Single texts and pairs cannot share one tokenizer call.
        singles = [i for i in chunk if examples[i].text_b is None]
        pairs = [i for i in chunk if examples[i].text_b is not None]
        for group in (singles, pairs):
            if not group:
                continue
            enc = _tokenize(tokenizer, [examples[i] for i in group], max_len)
            for j, i in enumerate(group):
                item = items[i]
                item["input_ids"] = token_array(enc["input_ids"][j])
                if "token_type_ids" in enc:
                    item["token_type_ids"] = token_array(enc["token_type_ids"][j])
                label = examples[i].label
                item["labels"] = float(label) if isinstance(label, float) else int(label)
    return EncodedDataset(items)


class PadCollator:
    """Pad a list of encoded items to the longest sequence in the batch (right padding).

    input_ids are padded with `pad_token_id`, token_type_ids with 0; attention_mask is
    1 on tokens and 0 on padding. Labels become a LongTensor (class indices) or a
    FloatTensor (regression scores).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        has_types = "token_type_ids" in features[0]
        token_type_ids = torch.zeros((n, width), dtype=torch.long) if has_types else None
        for row, (f, length) in enumerate(zip(features, lengths, strict=True)):
            input_ids[row, :length] = long_tensor(f["input_ids"])
            attention_mask[row, :length] = 1
            if token_type_ids is not None:
                token_type_ids[row, :length] = long_tensor(f["token_type_ids"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            dtype = torch.float32 if isinstance(labels[0], float) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch


def make_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    pad_token_id: int,
    drop_last: bool = False,
    collator: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
) -> DataLoader:
    """A single-process DataLoader whose batch order is fixed by `seed`; batches are
    padded by `collator` (default: `PadCollator(pad_token_id)`)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collator or PadCollator(pad_token_id),
        num_workers=0,
        drop_last=drop_last,
    )
