"""SQuAD v1.1 (`squad`): extractive question answering over Wikipedia paragraphs.

A folder holds `dev-v1.1.json` and, when available, `train-v1.1.json` (the official
JSON: `data[].title`, `paragraphs[].context`, `qas[].id / question / answers[{text,
answer_start}]`). With a training file (in `task.data_dir` or named by
`task.train_file`) the model trains on it and is scored on the whole dev file.

Offline there is only the dev file (48 articles, 10,570 questions): it is then split
by article, so no paragraph is seen in both parts. `task.split_eval` (default 0.2) of
the articles are held out for evaluation (10 of 48), the rest train. The split is
drawn with a fixed seed (`SPLIT_SEED`), not the run's, and so is the
`max_eval_examples` subsample of evaluation questions: every seed of a comparison is
scored on the same questions. `max_train_examples` subsamples training questions
with the run's seed.

An answer whose `answer_start` does not point at its text in the context is dropped; a
question left without any answer is skipped. Both are counted
(`QATask.dropped_answers`, `QATask.skipped_questions`) and reported in a warning.

Each example's label is its article's index, so label-based federated partitioners
(dirichlet, shards) skew clients by article.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cotune.data.sampling import rng_for, subsample
from cotune.data.squad_metrics import METRIC_KEYS, squad_scores
from cotune.data.task import Example, Task
from cotune.errors import ConfigError, DataError

NAME = "squad"
DEFAULT_DIR = "../shared/data/squad_v1.1"
TRAIN_FILE = "train-v1.1.json"
DEV_FILE = "dev-v1.1.json"
SOURCE = f"task.data_dir (folder with {DEV_FILE}, optionally {TRAIN_FILE}; default {DEFAULT_DIR})"
EVAL_SPLIT = "eval"
DEFAULT_EVAL_FRACTION = 0.2  # of the dev file's articles, when there is no training file
SPLIT_SEED = 0  # the same article split and eval subsample for every run seed
EXPECTED = (
    'SQuAD v1.1 JSON: {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", '
    '"question", "answers": [{"text", "answer_start"}]}]}]}]}'
)


@dataclass
class QAExample(Example):
    """One question: `text_a` the question, `text_b` the context, `label` the article
    index; `answers` the ground-truth texts and `answer_starts` their character offsets
    in the context (the first is the training target)."""

    qid: str = ""
    answers: tuple[str, ...] = ()
    answer_starts: tuple[int, ...] = ()

    @property
    def question(self) -> str:
        return self.text_a

    @property
    def context(self) -> str:
        return self.text_b or ""


@dataclass
class QATask(Task):
    """An extractive QA task: predictions are answer texts, scored by SQuAD EM / F1."""

    skipped_questions: int = 0
    dropped_answers: int = 0
    articles: dict[str, list[str]] = field(default_factory=dict)  # part -> titles

    def compute_metrics(  # type: ignore[override]
        self, split: str, preds: Sequence[str], labels: np.ndarray | None = None
    ) -> dict[str, float]:
        """SQuAD exact match and F1 of predicted texts (one per example of `split`)."""
        truths = [ex.answers for ex in self.eval[split] if isinstance(ex, QAExample)]
        return squad_scores(list(preds), truths)


@dataclass
class _Parsed:
    articles: list[tuple[str, list[QAExample]]]  # (title, questions)
    skipped: int = 0
    dropped: int = 0


def _expect(cond: bool, path: Path, where: str) -> None:
    if not cond:
        raise DataError(f"{path}: {where} is not as expected; a SQuAD file is {EXPECTED}")


def read_squad(path: Path) -> _Parsed:
    """Every article of a SQuAD v1.1 file with its valid questions; a file that is not
    SQuAD JSON is a DataError naming it and the expected layout."""
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read as JSON ({exc}); expected {EXPECTED}") from None
    _expect(isinstance(raw, dict) and isinstance(raw.get("data"), list), path, "the top level")
    parsed = _Parsed(articles=[])
    for a, article in enumerate(raw["data"]):
        _expect(isinstance(article, dict) and isinstance(article.get("paragraphs"), list),
                path, f"data[{a}]")  # fmt: skip
        questions: list[QAExample] = []
        for p, para in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            _expect(isinstance(para, dict) and isinstance(para.get("context"), str)
                    and isinstance(para.get("qas"), list), path, where)  # fmt: skip
            context = para["context"]
            for q, qa in enumerate(para["qas"]):
                _expect(isinstance(qa, dict) and isinstance(qa.get("question"), str)
                        and isinstance(qa.get("answers"), list), path, f"{where}.qas[{q}]")  # fmt: skip
                texts, starts = [], []
                for ans in qa["answers"]:
                    _expect(isinstance(ans, dict) and isinstance(ans.get("text"), str)
                            and isinstance(ans.get("answer_start"), int),
                            path, f"{where}.qas[{q}].answers")  # fmt: skip
                    text, start = ans["text"], ans["answer_start"]
                    if context[start : start + len(text)] != text or not text:
                        parsed.dropped += 1
                        continue
                    texts.append(text)
                    starts.append(start)
                if not texts:
                    parsed.skipped += 1
                    continue
                qid = str(qa.get("id", f"{a}-{p}-{q}"))
                questions.append(
                    QAExample(qa["question"].strip(), context, a, qid, tuple(texts), tuple(starts))
                )
        parsed.articles.append((str(article.get("title", f"article {a}")), questions))
    if not any(qs for _, qs in parsed.articles):
        raise DataError(f"{path} holds no question with a valid answer; expected {EXPECTED}")
    return parsed


def split_articles(n_articles: int, eval_fraction: float) -> tuple[list[int], list[int]]:
    """(train, eval) article indices, sorted: round(n * fraction) held out (at least
    one, at most n - 1), drawn with `SPLIT_SEED` so every run holds out the same ones."""
    if n_articles < 2:
        raise DataError(f"splitting by article needs at least 2 articles, found {n_articles}")
    n_eval = min(max(int(round(n_articles * eval_fraction)), 1), n_articles - 1)
    order = rng_for(SPLIT_SEED, "squad/articles").permutation(n_articles)
    return sorted(int(i) for i in order[n_eval:]), sorted(int(i) for i in order[:n_eval])


def _warn_skipped(path: Path, parsed: _Parsed) -> None:
    if parsed.skipped or parsed.dropped:
        warnings.warn(
            f"{path}: {parsed.dropped} answers whose answer_start does not match the context "
            f"were dropped; {parsed.skipped} questions left without an answer were skipped",
            stacklevel=3,
        )


def load_squad(
    data_dir: str | None,
    seed: int,
    max_train_examples: int | None,
    max_eval_examples: int | None,
    *,
    split_eval: float | None = None,
    train_file: str | None = None,
) -> QATask:
    """SQuAD v1.1 from `data_dir` (default `DEFAULT_DIR`): the training file when there
    is one, else a by-article split of the dev file; seeded question subsamples."""
    root = Path(data_dir or DEFAULT_DIR).expanduser()
    dev_path = root / DEV_FILE
    if not dev_path.is_file():
        raise DataError(
            f"task.data_dir {str(root)!r} has no {DEV_FILE}; squad needs a folder holding "
            f"{DEV_FILE} (and optionally {TRAIN_FILE}), e.g. {DEFAULT_DIR}"
        )
    train_path = Path(train_file).expanduser() if train_file else root / TRAIN_FILE
    if train_file and not train_path.is_file():
        raise DataError(f"task.train_file {train_file!r} is not a file; give a {TRAIN_FILE}")
    dev = read_squad(dev_path)
    _warn_skipped(dev_path, dev)
    skipped, dropped = dev.skipped, dev.dropped
    if train_path.is_file():
        if split_eval is not None:
            raise ConfigError(
                f"task.split_eval splits {DEV_FILE} when there is no training file; "
                f"{train_path} exists: remove task.split_eval to train on it"
            )
        train_parsed = read_squad(train_path)
        _warn_skipped(train_path, train_parsed)
        skipped += train_parsed.skipped
        dropped += train_parsed.dropped
        train_articles, eval_articles = train_parsed.articles, dev.articles
        source = f"{train_path} + {dev_path}"
    else:
        fraction = DEFAULT_EVAL_FRACTION if split_eval is None else split_eval
        train_idx, eval_idx = split_articles(len(dev.articles), fraction)
        train_articles = [dev.articles[i] for i in train_idx]
        eval_articles = [dev.articles[i] for i in eval_idx]
        source = (
            f"{dev_path} (by-article split: {len(eval_idx)} of {len(dev.articles)} articles "
            f"held out, split seed {SPLIT_SEED})"
        )
    train: list[Example] = [ex for _, qs in train_articles for ex in qs]
    evals: list[Example] = [ex for _, qs in eval_articles for ex in qs]
    return QATask(
        name=NAME,
        kind="qa",
        num_labels=0,
        label_names=[],
        train=subsample(train, max_train_examples, seed, "train"),
        eval={EVAL_SPLIT: subsample(evals, max_eval_examples, SPLIT_SEED, "eval/squad")},
        primary_metric="f1",
        metrics={EVAL_SPLIT: METRIC_KEYS},
        source=source,
        skipped_questions=skipped,
        dropped_answers=dropped,
        articles={
            "train": [t for t, _ in train_articles],
            EVAL_SPLIT: [t for t, _ in eval_articles],
        },
    )
