"""The e2e task and the causal-LM pieces: loading, MR-level subsampling, completion-only
labels, dynamic padding, the loss, and beam search through GPT-2 and Llama code."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cotune.config import build_config
from cotune.config.schema import TaskConfig
from cotune.data import canonical_name, load_task
from cotune.data.pairs import IGNORE, PairCollator, encode_pairs
from cotune.errors import DataError
from cotune.models.causal_lm import build_lm, completion_loss
from cotune.training.evaluation import generate_texts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        w.writerows(rows)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/e2e is not here")
def test_shared_e2e_loads_with_all_references_per_mr() -> None:
    task = load_task(TaskConfig(name="E2E", data_dir=str(SHARED)), seed=0)
    assert task.kind == "generation" and len(task.train) == 42061
    assert len(task.eval["test"]) == 630  # distinct MRs of the official test set
    assert sum(len(r) for r in task.references["test"]) == 4693
    sub = load_task(
        TaskConfig(name="e2e", data_dir=str(SHARED), max_train_examples=50, max_eval_examples=7),
        seed=1,
    )
    assert len(sub.train) == 50 and len(sub.eval["test"]) == 7
    full = dict(zip((e.text_a for e in task.eval["test"]), task.references["test"], strict=True))
    for ex, refs in zip(sub.eval["test"], sub.references["test"], strict=True):
        assert refs == full[ex.text_a]  # an MR keeps every one of its references


def test_folder_layout_errors_name_the_missing_file(tmp_path: Path) -> None:
    assert canonical_name("e2e-nlg") == "e2e"
    with pytest.raises(DataError, match="trainset.csv"):
        write_csv(tmp_path / "testset_w_refs.csv", [("name[a]", "a.")])
        load_task(TaskConfig(name="e2e", data_dir=str(tmp_path)), seed=0)


def test_labels_cover_the_completion_only_and_padding_is_dynamic(tmp_path: Path) -> None:
    cfg = build_config({"model": {"name": "tiny-llama"}})
    _, tok, _ = build_lm(cfg.model, seed=cfg.seed)
    from cotune.data.task import Example

    data = encode_pairs(
        [Example("name[x], food[y]", "x serves y food.", 0), Example("name[z]", "z.", 0)],
        tok,
        max_len=32,
    )
    for item in data:
        n_prompt = sum(1 for t in item["labels"] if t == IGNORE)
        assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
        assert item["labels"][-1] == tok.sep_token_id  # the target ends with EOS/SEP
    batch = PairCollator(tok.pad_token_id)([data[0], data[1]])
    assert batch["input_ids"].shape[1] == max(len(x["input_ids"]) for x in data)
    assert int(batch["attention_mask"].sum()) == sum(len(x["input_ids"]) for x in data)


def test_completion_loss_ignores_prompt_and_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 7, 8, 9, 10]])
    got = completion_loss(logits, labels)
    rows = [(0, 1, 3), (0, 2, 4), (1, 0, 7), (1, 1, 8), (1, 2, 9), (1, 3, 10)]
    manual = torch.stack([-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in rows]).mean()
    torch.testing.assert_close(got, manual)
    smooth = completion_loss(logits, labels, label_smoothing=0.1)
    assert not torch.isclose(smooth, got)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_beam_search_generates_for_each_prompt(model: str) -> None:
    cfg = build_config(
        {
            "model": {"name": model, "lora": {"r": 2}},
            "generation": {"num_beams": 3, "max_new_tokens": 5, "batch_size": 2},
        }
    )
    m, tok, _ = build_lm(cfg.model, seed=cfg.seed)
    outs = generate_texts(m.lm, tok, ["name[a]", "name[bb], food[c]", "name[d]"], cfg.generation)
    assert len(outs) == 3 and all(isinstance(o, str) and o for o in outs)
    # left padding: a prompt decodes the same alone as in a batch
    assert generate_texts(m.lm, tok, ["name[bb], food[c]"], cfg.generation)[0] == outs[1]
