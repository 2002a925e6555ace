"""Prompt + completion pairs for causal-LM fine-tuning (generation tasks such as `e2e`).

- `encode_pairs`: prompt + target tokenised once; labels are the target tokens only
  (prompt positions are -100), the target ends with EOS; no padding. A tokenizer that
  starts every text with its BOS token by default (Gemma's) gets it before the prompt,
  in training and generation alike (Gemma 3 270M's completion loss on an E2E pair was
  8.57 without it, 3.24 with it); the others (SmolLM2, GPT-2, WordPiece) get none.
- `PairCollator`: dynamic padding to the batch's longest row (right padding), so only
  real tokens are computed on and, in split methods, only real tokens cross the link.
- `pair_loader`: a seeded single-process loader of such pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cotune.data.aside import aside
from cotune.data.encode import long_tensor, make_loader, token_array
from cotune.data.task import Example

IGNORE = -100
PROMPT_SUFFIX = " ||"  # "MR ||" then " reference<eos>", as in the microsoft/LoRA E2E format


def eos_id(tokenizer: Any) -> int:
    """The id that ends a target (EOS, else SEP for WordPiece tokenizers)."""
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither an EOS nor a SEP token to end targets with")


def bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer's own default encoding starts with its BOS token, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    first = list(tokenizer("a")["input_ids"])[:1]
    return [int(bos)] if first == [bos] else []


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer(prompt + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
    return bos_prefix(tokenizer) + list(ids)


class PairDataset(Dataset):
    """Tokenised (prompt, target) pairs: item i is {"input_ids", "labels"} (unpadded)."""

    def __init__(self, items: list[dict[str, Sequence[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Sequence[int]]:
        return self.items[i]

    def subset(self, indices: list[int]) -> PairDataset:
        return PairDataset([self.items[i] for i in indices])


@aside
def encode_pairs(examples: list[Example], tokenizer: Any, max_len: int) -> PairDataset:
    """Prompt (`text_a`) + target (`text_b`) + EOS, truncated to `max_len` tokens
    (the target is cut first; the prompt keeps at most `max_len // 2`); on a helper
    thread (`cotune.data.aside`)."""
    end = eos_id(tokenizer)
    bos = bos_prefix(tokenizer)
    prompts = [ex.text_a + PROMPT_SUFFIX for ex in examples]
    targets = [" " + (ex.text_b or "") for ex in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    items: list[dict[str, Sequence[int]]] = []
    for p, t in zip(p_ids, t_ids, strict=True):
        p = (bos + list(p))[: max(max_len // 2, 1)]
        t = (list(t) + [end])[: max_len - len(p)]
        items.append(
            {"input_ids": token_array(p + t), "labels": token_array([IGNORE] * len(p) + t)}
        )
    return PairDataset(items)


class PairCollator:
    """Right-pad a batch to its longest row: input_ids with `pad_token_id`, labels with
    -100, attention_mask 1 on real tokens."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, Sequence[int]]]) -> dict[str, Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[row, :k] = long_tensor(f["input_ids"])
            labels[row, :k] = long_tensor(f["labels"])
            mask[row, :k] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pair_loader(
    ds: Dataset, batch_size: int, shuffle: bool, seed: int, pad_token_id: int
) -> DataLoader:
    """A single-process loader of pairs whose order is fixed by `seed`."""
    return make_loader(
        ds, batch_size, shuffle, seed, pad_token_id, collator=PairCollator(pad_token_id)
    )
