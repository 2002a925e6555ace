"""SQuAD v1.1: the official metrics, the by-article split, validation, context
windows, span post-processing, the span loss, and tiny-bert QA runs (centralized,
fedlora, fedavg, split)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_squad
from torch import nn

from cotune.config import build_config
from cotune.config.schema import TaskConfig
from cotune.data import canonical_name, load_task
from cotune.data.qa_features import answer_tokens, encode_qa
from cotune.data.qa_postprocess import predict_answers
from cotune.data.squad import QAExample, load_squad, split_articles
from cotune.data.squad_metrics import normalize_answer, squad_scores
from cotune.errors import DataError
from cotune.models import load_tokenizer

SHARED = Path("/work/shared/data/squad_v1.1")


# ----------------------------------------------------------------------------- metrics


def test_metrics_on_a_worked_example() -> None:
    assert normalize_answer("The  Denver, Broncos!") == "denver broncos"
    # 1: "the Denver Broncos" normalises to "denver broncos": an exact match, F1 1.
    # 2: "Denver" vs "Denver Broncos": 1 common token, precision 1/1, recall 1/2,
    #    F1 = 2 * 1 * 0.5 / 1.5 = 2/3; no exact match.
    # 3: "in 1990" vs ["1989", "the year 1990"]: best F1 against "year 1990"
    #    (precision 1/2, recall 1/2 -> 1/2); no exact match.
    preds = ["the Denver Broncos", "Denver", "in 1990"]
    truths = [["Denver Broncos", "Broncos"], ["Denver Broncos"], ["1989", "the year 1990"]]
    scores = squad_scores(preds, truths)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 2) / 3)
    assert squad_scores(["Denver"], [["Denver Broncos"]])["f1"] == pytest.approx(66.6667, abs=1e-3)
    assert squad_scores([""], [["x"]]) == {"exact_match": 0.0, "f1": 0.0}


# ------------------------------------------------------------------------------ loading


def test_names_and_aliases() -> None:
    for name in ("squad", "SQuAD1.1", "squad-v1.1"):
        assert canonical_name(name) == "squad"


def test_split_by_article_is_disjoint_seeded_and_stable(tmp_path: Path) -> None:
    train, held = split_articles(48, 0.2)
    assert (len(train), len(held)) == (38, 10)
    assert not set(train) & set(held) and sorted(train + held) == list(range(48))
    assert split_articles(48, 0.2) == (train, held)
    folder = write_squad(tmp_path, n_articles=10)
    a = load_squad(str(folder), seed=1, max_train_examples=None, max_eval_examples=None)
    b = load_squad(str(folder), seed=2, max_train_examples=None, max_eval_examples=None)
    assert a.kind == "qa" and a.primary_metric == "f1"
    assert a.articles == b.articles  # the split does not depend on the run seed
    assert len(a.articles["eval"]) == 2 and not set(a.articles["train"]) & set(a.articles["eval"])
    assert [ex.qid for ex in a.eval["eval"]] == [ex.qid for ex in b.eval["eval"]]
    train_ctx = {ex.text_b for ex in a.train}
    assert not train_ctx & {ex.text_b for ex in a.eval["eval"]}
    c = load_task(TaskConfig(name="squad", data_dir=str(folder), split_eval=0.5,
                             max_train_examples=5, max_eval_examples=3), seed=0)  # fmt: skip
    assert len(c.train) == 5 and len(c.eval["eval"]) == 3


@pytest.mark.skipif(not SHARED.is_dir(), reason="no shared SQuAD copy")
def test_shared_dev_file_splits_38_to_10_articles() -> None:
    task = load_squad(str(SHARED), 0, None, None)
    assert (len(task.articles["train"]), len(task.articles["eval"])) == (38, 10)
    assert len(task.train) + len(task.eval["eval"]) == 10570
    assert task.skipped_questions == 0


def test_answer_offset_mismatch_is_dropped_counted_and_warned(tmp_path: Path) -> None:
    folder = write_squad(tmp_path, n_articles=4)
    raw = json.loads((folder / "dev-v1.1.json").read_text())
    qas = raw["data"][0]["paragraphs"][0]["qas"]
    qas[0]["answers"] = [{"text": "nowhere", "answer_start": 0}]  # whole question skipped
    qas[1]["answers"][1]["answer_start"] += 1  # one of two answers dropped
    (folder / "dev-v1.1.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="2 answers .* 1 questions"):
        task = load_squad(str(folder), 0, None, None, split_eval=0.5)
    assert (task.skipped_questions, task.dropped_answers) == (1, 2)
    ids = {ex.qid for ex in [*task.train, *task.eval["eval"]]}
    assert "a0q0" not in ids and len(ids) == 4 * 4 - 1


def test_a_file_that_is_not_squad_names_itself(tmp_path: Path) -> None:
    (tmp_path / "dev-v1.1.json").write_text(json.dumps({"rows": [1, 2]}))
    with pytest.raises(DataError, match=r"dev-v1\.1\.json.*SQuAD v1\.1 JSON"):
        load_squad(str(tmp_path), 0, None, None)
    (tmp_path / "dev-v1.1.json").write_text("not json")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        load_squad(str(tmp_path), 0, None, None)
    with pytest.raises(DataError, match="has no dev-v1.1.json"):
        load_squad(str(tmp_path / "absent"), 0, None, None)


def test_a_train_file_is_used_when_given(tmp_path: Path) -> None:
    dev = write_squad(tmp_path / "dev", n_articles=3)
    train = write_squad(tmp_path / "train", n_articles=5, seed=1) / "dev-v1.1.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task = load_squad(str(dev), 0, None, None, train_file=str(train))
    assert len(task.train) == 20 and len(task.eval["eval"]) == 12


# ----------------------------------------------------------------------------- features


def _example(question: str, context: str, answer: str, occurrence: int = 0) -> QAExample:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return QAExample(question, context, 0, "q", (answer,), (start,))


def test_answer_span_tokens_decode_to_the_answer_in_every_window() -> None:
    tok = load_tokenizer("tiny-bert")
    filler = " ".join(f"word{i} is here ." for i in range(60))  # far more than one window
    context = f"{filler} the treasure lies under the old oak tree . {filler}"
    ex = _example("where is the treasure ?", context, "under the old oak tree")
    short = _example("what colour is it ?", "it is dark blue today .", "dark blue")
    feats = encode_qa([ex, short], tok, max_len=64, stride=16)
    windows = [k for k, i in enumerate(feats.example_index) if i == 0]
    assert len(windows) > 3 and feats.example_index[-1] == 1  # overflow, order kept
    hits = 0
    for k in range(len(feats)):
        start, end = feats[k]["labels"]
        assert len(feats[k]["input_ids"]) <= 64
        if (start, end) == (0, 0):
            continue
        hits += 1
        text = tok.decode(list(feats[k]["input_ids"][start : end + 1]))
        expected = "under the old oak tree" if feats.example_index[k] == 0 else "dark blue"
        assert text == expected
        offs = feats.offsets[k]
        source = [ex, short][feats.example_index[k]].context
        assert source[offs[start, 0] : offs[end, 1]] == expected
    assert hits >= 2  # the long answer lies whole in at least one window, the short one too


def test_answer_outside_the_window_is_cls() -> None:
    offsets = np.array([[-1, -1], [0, 3], [4, 8], [-1, -1]])
    assert answer_tokens(offsets, 4, 8) == (2, 2)
    assert answer_tokens(offsets, 0, 8) == (1, 2)
    assert answer_tokens(offsets, 6, 12) == (0, 0)


def test_a_question_longer_than_the_window_is_a_clear_error() -> None:
    tok = load_tokenizer("tiny-bert")
    ex = _example(" ".join(["why"] * 40) + " ?", "because it is .", "because")
    with pytest.raises(DataError, match=r"train\.max_seq_len.*at least 4[0-9]"):
        encode_qa([ex], tok, max_len=32)


# ------------------------------------------------------------------------ post-process


def test_post_processing_picks_the_best_valid_span_over_windows() -> None:
    contexts = ["red fox jumps", "sky is blue"]
    # tokens: [CLS] q [SEP] c c c [SEP]; context offsets of the three words
    offs0 = np.array([[-1, -1], [-1, -1], [-1, -1], [0, 3], [4, 7], [8, 13], [-1, -1]])
    offs1 = np.array([[-1, -1], [-1, -1], [-1, -1], [0, 3], [4, 6], [7, 11], [-1, -1]])
    neg = np.full(7, -5.0)

    def logits(**at: float) -> np.ndarray:
        out = neg.copy()
        for k, v in at.items():
            out[int(k[1:])] = v
        return out

    # example 0, window A: the best raw pair (start 0 = CLS) is not a context token;
    # (3, 4) "red fox" scores 4 + 3. Window B (same example): (5, 5) "jumps" scores 9.
    # example 1: end before start at (5, 3) is invalid; (5, 5) "blue" wins.
    answers = predict_answers(
        contexts,
        [0, 0, 1],
        [offs0, offs0, offs1],
        [logits(t0=10, t3=4), logits(t5=5), logits(t5=6)],
        [logits(t0=10, t4=3), logits(t5=4), logits(t3=9, t5=2)],
    )
    assert answers == ["jumps", "blue"]
    # (3, 5) scores 10 but is 3 tokens long; of the spans of at most 2, (3, 4) scores 7
    starts, ends = logits(t3=5, t4=1), logits(t5=5, t4=2)
    assert predict_answers(contexts[:1], [0], [offs0], [starts], [ends]) == ["red fox jumps"]
    short = predict_answers(contexts[:1], [0], [offs0], [starts], [ends], max_answer_len=2)
    assert short == ["red fox"]
    assert predict_answers(["x"], [], [], [], []) == [""]


# ------------------------------------------------------------------------------- model


def test_span_model_loss_and_lora_head() -> None:
    from cotune.models.lora import unwrap
    from cotune.models.span import SpanExtractor, build_span_model

    cfg = build_config({"model": {"name": "tiny-bert", "lora": {"r": 2, "alpha": 4}}})
    model, _, _ = build_span_model(cfg.model, seed=0)
    assert isinstance(unwrap(model), SpanExtractor)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("head" in n for n in trainable) and any("lora_A" in n for n in trainable)
    ids = torch.randint(1000, 2000, (2, 9))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                labels=torch.tensor([[1, 2], [0, 0]]))  # fmt: skip
    assert out.start_logits.shape == (2, 9) and out.loss is not None and out.loss > 0


def test_span_loss_leaves_padding_out() -> None:
    from cotune.models.span import span_loss

    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    labels = torch.tensor([[2, 4], [0, 2]])
    loss = span_loss(start, end, labels, mask)
    # padded positions' logits do not count, whatever they are
    noisy_start, noisy_end = start.clone(), end.clone()
    noisy_start[1, 3:], noisy_end[1, 3:] = 50.0, -50.0
    assert span_loss(noisy_start, noisy_end, labels, mask) == pytest.approx(float(loss))
    assert span_loss(noisy_start, noisy_end, labels) != pytest.approx(float(loss))
    # it is the cross-entropy over each row's real tokens
    by_row = [
        nn.functional.cross_entropy(x[row : row + 1, :n], labels[row : row + 1, k])
        for k, x in enumerate((start, end))
        for row, n in enumerate((6, 3))
    ]
    assert float(loss) == pytest.approx(float(sum(by_row)) / 4)


# -------------------------------------------------------------------------- end to end


def _run_cfg(data: Path, method: str, **extra: dict) -> object:
    from cotune.methods import resolve

    raw: dict = {
        "name": f"squad-{method}", "method": method, "seed": 0,
        "task": {"name": "squad", "data_dir": str(data), "split_eval": 0.25,
                 "max_eval_examples": 6},
        "model": {"name": "tiny-bert", "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "train": {"steps": 3, "batch_size": 4, "max_seq_len": 32, "threads": 1,
                  "eval_every": 100},
        **extra,
    }  # fmt: skip
    return resolve(build_config(raw))


def _check_run(out: Path, n_eval: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert {"exact_match", "f1"} <= set(metrics)
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == n_eval
    assert {"id", "question", "prediction", "answers", "exact_match", "f1"} <= set(recs[0])
    assert np.mean([r["f1"] for r in recs]) == pytest.approx(metrics["f1"])


@pytest.mark.slow
def test_centralized_tiny_bert_trains_and_reports_squad_metrics(tmp_path: Path) -> None:
    from cotune.runtime.experiment import run_experiment

    data = write_squad(tmp_path / "squad", n_articles=8)
    out = run_experiment(_run_cfg(data, "centralized"), tmp_path / "run")  # type: ignore[arg-type]
    _check_run(out, 6)


@pytest.mark.slow
def test_fedlora_tiny_bert_trains_and_reports_squad_metrics(tmp_path: Path) -> None:
    from cotune.runtime.experiment import run_experiment

    data = write_squad(tmp_path / "squad", n_articles=8)
    cfg = _run_cfg(data, "fedlora", federated={"clients": 2, "rounds": 2, "local_steps": 1},
                   runtime={"engine": "inline"})  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run")  # type: ignore[arg-type]
    _check_run(out, 6)


@pytest.mark.slow
@pytest.mark.parametrize("memory", [{"backward": "norm", "checkpoint": True}, {"report": True}])
def test_centralized_full_fine_tuning_with_the_memory_option(tmp_path: Path, memory: dict) -> None:
    from cotune.methods import resolve
    from cotune.runtime.experiment import run_experiment

    data = write_squad(tmp_path / "squad", n_articles=8)
    cfg = _run_cfg(data, "centralized", memory=memory)
    cfg.model.lora = None  # type: ignore[attr-defined]
    out = run_experiment(resolve(cfg), tmp_path / "run")  # type: ignore[arg-type]
    _check_run(out, 6)


@pytest.mark.slow
def test_fedavg_tiny_bert_trains_and_reports_squad_metrics(tmp_path: Path) -> None:
    from cotune.runtime.experiment import run_experiment

    data = write_squad(tmp_path / "squad", n_articles=8)
    cfg = _run_cfg(data, "fedavg", federated={"clients": 2, "rounds": 1, "local_steps": 1},
                   runtime={"engine": "inline"}, model={"name": "tiny-bert"})  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run")  # type: ignore[arg-type]
    _check_run(out, 6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("link", "labels"),
    [
        ({"codec": "identity"}, "cloud"),
        ({"codec": "int8"}, "cloud"),
        ({"codec": "sft", "rank": 8}, "cloud"),
        ({"codec": "sft", "rank": 8}, "device"),
    ],
)
def test_split_tiny_bert_trains_and_reports_squad_metrics(
    tmp_path: Path, link: dict, labels: str
) -> None:
    from cotune.runtime.experiment import run_experiment

    data = write_squad(tmp_path / "squad", n_articles=8)
    cfg = _run_cfg(data, "split", model={"name": "tiny-bert"}, link=link,
                   split={"cut": 1, "labels": labels})  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run")  # type: ignore[arg-type]
    _check_run(out, 6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["link"]["codec"] == link["codec"] and summary["link"]["labels"] == labels
    assert summary["comm"]["bytes_up"] > 0 and summary["comm"]["bytes_down"] > 0


def test_splitfed_refuses_qa(tmp_path: Path) -> None:
    from cotune.errors import ConfigError

    with pytest.raises(ConfigError, match="splitfed fine-tunes causal LMs on generation tasks"):
        _run_cfg(tmp_path, "splitfed")
