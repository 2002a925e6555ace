"""GLUE loading from folders in the standard TSV layout, names, errors and metrics."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cotune.config.schema import TaskConfig
from cotune.data import canonical_name, list_tasks, load_task, task_names
from cotune.errors import ConfigError, DataError

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
GLUE = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]


def write(folder: Path, name: str, lines: list[str], bom: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (folder / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def tsv(*cols: str) -> str:
    return "\t".join(cols)


MNLI_HEAD = tsv(
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2",
    "label3", "label4", "label5", "gold_label",
)  # fmt: skip


def mnli_row(i: int, s1: str, s2: str, gold: str) -> str:
    return tsv(str(i), "31193", f"{i}n", "government", "( x )", "( y )", "(ROOT x)", "(ROOT y)",
               s1, s2, gold, gold, gold, gold, gold, gold)  # fmt: skip


MNLI_TRAIN_HEAD = tsv(*MNLI_HEAD.split("\t")[:11], "gold_label")


def mnli_train_row(i: int, s1: str, s2: str, gold: str) -> str:
    return tsv(*mnli_row(i, s1, s2, gold).split("\t")[:11], gold)


def stsb_row(i: int, s1: str, s2: str, score: str) -> str:
    return tsv(
        str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s1, s2, score
    )


STSB_HEAD = tsv("index", "genre", "filename", "year", "old_index", "source1", "source2",
                "sentence1", "sentence2", "score")  # fmt: skip


def make_fixture(root: Path, task: str) -> Path:
    """A tiny folder in the exact GLUE layout for `task`; returns the folder."""
    d = root / task
    if task == "cola":  # no header: source, label, original label, sentence
        write(d, "train.tsv", [
            tsv("gj04", "1", "", "Our friends won't buy this analysis, let alone the next one."),
            tsv("gj04", "0", "*", "They drank the pub."),
            tsv("cj99", "1", "", 'He said "hello to them.'),
        ])  # fmt: skip
        write(d, "dev.tsv", [tsv("gj04", "0", "*", "The more we study verbs."),
                             tsv("gj04", "1", "", "Bill left.")])  # fmt: skip
    elif task == "sst2":
        write(d, "train.tsv", ["sentence\tlabel", "hide new secretions from the parental units \t0",
                               'a "quoted phrase and an unbalanced " mark \t1',
                               "the greatest musicians \t1"])  # fmt: skip
        write(d, "dev.tsv", ["sentence\tlabel", "it 's a charming journey . \t1",
                             "unflinchingly bleak \t0"])  # fmt: skip
    elif task == "mrpc":
        head = tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
        write(d, "train.tsv", [head, tsv("1", "702876", "702977", "Amrozi accused his brother.",
                                         "Referring to him, Amrozi accused his brother."),
                               tsv("0", "2108705", "2108831", "Yucaipa owned Dominick 's.",
                                   "Yucaipa bought Dominick 's in 1995.")], bom=True)  # fmt: skip
        write(d, "dev.tsv", [head, tsv("1", "1", "2", "He said so.", "So he said."),
                             tsv("1", "3", "4", "A cat.", "A feline."),
                             tsv("0", "5", "6", "Rain.", "Sun."),
                             tsv("0", "7", "8", "Up.", "Down.")], bom=True)  # fmt: skip
    elif task == "qqp":
        head = tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
        write(d, "train.tsv", [head, tsv("1", "1", "2", "How do I learn Python?",
                                         "What is the best way to learn Python?", "1"),
                               tsv("2", "3", "4", "Why is the sky blue?",
                                   "How tall is Everest?", "0")])  # fmt: skip
        write(d, "dev.tsv", [head, tsv("3", "5", "6", "Is it a?", "Is it b?", "0"),
                             tsv("4", "7", "8", "What is c?", "What's c?", "1")])  # fmt: skip
    elif task == "stsb":
        write(d, "train.tsv", [STSB_HEAD, stsb_row(0, "A plane is taking off.",
                                                   "An air plane is taking off.", "5.000"),
                               stsb_row(1, "A man plays a flute.", "A man plays a bamboo flute.",
                                        "3.800"),
                               stsb_row(2, "A cat.", "A market crash.", "0.000")])  # fmt: skip
        write(d, "dev.tsv", [STSB_HEAD, stsb_row(0, "a", "b", "1.0"), stsb_row(1, "c", "d", "2.5"),
                             stsb_row(2, "e", "f", "4.2")])  # fmt: skip
    elif task == "mnli":  # train: 12 columns (label1, gold_label); dev: 16 (label1..5, gold)
        write(d, "train.tsv", [MNLI_TRAIN_HEAD,
                               mnli_train_row(0, "Conceptually cream skimming.", "Product.",
                                              "neutral"),
                               mnli_train_row(1, "you know during the season", "You lose.",
                                              "entailment"),
                               mnli_train_row(2, "One of our number.", "Nobody.",
                                              "contradiction")])  # fmt: skip
        write(d, "dev_matched.tsv", [MNLI_HEAD, mnli_row(0, "a", "b", "entailment"),
                                     mnli_row(1, "c", "d", "contradiction")])  # fmt: skip
        write(d, "dev_mismatched.tsv", [MNLI_HEAD, mnli_row(0, "e", "f", "neutral"),
                                        mnli_row(1, "g", "h", "neutral"),
                                        mnli_row(2, "i", "j", "entailment")])  # fmt: skip
    elif task == "qnli":
        head = tsv("index", "question", "sentence", "label")
        write(d, "train.tsv", [head, tsv("0", "When?", "In 1990.", "entailment"),
                               tsv("1", "Who?", "It rained.", "not_entailment")])  # fmt: skip
        write(d, "dev.tsv", [head, tsv("0", "Where?", "In Paris.", "entailment"),
                             tsv("1", "Why?", "Blue.", "not_entailment")])  # fmt: skip
    elif task in ("rte", "wnli"):
        head = tsv("index", "sentence1", "sentence2", "label")
        yes, no = ("entailment", "not_entailment") if task == "rte" else ("1", "0")
        write(d, "train.tsv", [head, tsv("0", "Dana Reeve died.", "Reeve is dead.", yes),
                               tsv("1", "Yet, we now are.", "We are not.", no),
                               tsv("2", "It was sunny.", "It was sunny.", yes)])  # fmt: skip
        write(d, "dev.tsv", [head, tsv("0", "A.", "B.", no), tsv("1", "C.", "C.", yes)])
    return d


def load(root: Path, task: str, **kw) -> object:
    return load_task(
        TaskConfig(name=f"glue/{task}", data_dir=str(make_fixture(root, task)), **kw), 0
    )


# --- every GLUE task from its standard layout ------------------------------------------


def test_cola_no_header(tmp_path):
    t = load(tmp_path, "cola")
    assert (t.name, t.kind, t.num_labels, t.primary_metric) == (
        "glue/cola",
        "classification",
        2,
        "mcc",
    )
    assert [e.label for e in t.train] == [1, 0, 1]
    assert t.train[2].text_a == 'He said "hello to them.'
    assert t.train[0].text_b is None
    assert list(t.eval) == ["eval"] and [e.label for e in t.eval["eval"]] == [0, 1]
    m = t.compute_metrics("eval", np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0]))
    assert m == {"mcc": pytest.approx(1.0)}
    m = t.compute_metrics("eval", np.array([1, 0, 0, 1]), np.array([0, 1, 1, 0]))
    assert m["mcc"] == pytest.approx(-1.0)


def test_sst2_header_and_quotes(tmp_path):
    t = load(tmp_path, "sst2")
    assert (t.kind, t.num_labels, t.label_names) == ("classification", 2, ["negative", "positive"])
    assert len(t.train) == 3 and len(t.eval["eval"]) == 2
    assert [e.label for e in t.train] == [0, 1, 1]
    # QUOTE_NONE: an unbalanced quote stays in its own row; trailing spaces are stripped
    assert t.train[1].text_a == 'a "quoted phrase and an unbalanced " mark'
    assert t.train[0].text_a == "hide new secretions from the parental units"
    m = t.compute_metrics("eval", np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    assert m == {"accuracy": pytest.approx(0.75)}


def test_mrpc_bom_header(tmp_path):
    t = load(tmp_path, "mrpc")
    assert (t.kind, t.num_labels, t.primary_metric) == ("classification", 2, "f1")
    assert [e.label for e in t.train] == [1, 0]
    assert t.train[0].text_a == "Amrozi accused his brother."
    assert t.train[0].text_b == "Referring to him, Amrozi accused his brother."
    labels = np.array([e.label for e in t.eval["eval"]])
    assert labels.tolist() == [1, 1, 0, 0]
    m = t.compute_metrics("eval", np.array([1, 0, 0, 0]), labels)
    assert set(m) == {"f1", "accuracy"}
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.75)


def test_qqp(tmp_path):
    t = load(tmp_path, "qqp")
    assert (t.kind, t.num_labels, t.primary_metric) == ("classification", 2, "f1")
    assert [e.label for e in t.train] == [1, 0]
    assert t.train[1].text_b == "How tall is Everest?"
    m = t.compute_metrics("eval", np.array([0, 1]), np.array([0, 1]))
    assert m == {"f1": pytest.approx(1.0), "accuracy": pytest.approx(1.0)}


def test_stsb_regression(tmp_path):
    t = load(tmp_path, "stsb")
    assert (t.kind, t.num_labels, t.primary_metric) == ("regression", 1, "spearman")
    assert [e.label for e in t.train] == [5.0, 3.8, 0.0]
    assert all(isinstance(e.label, float) for e in t.train)
    assert t.train[1].text_a == "A man plays a flute."
    assert t.train[1].text_b == "A man plays a bamboo flute."
    labels = np.array([e.label for e in t.eval["eval"]])
    m = t.compute_metrics("eval", 2 * labels + 1, labels)  # linear: both correlations 1
    assert m == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    m = t.compute_metrics("eval", np.array([1.0, 3.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    assert m["pearson"] == pytest.approx(0.5) and m["spearman"] == pytest.approx(0.5)
    m = t.compute_metrics("eval", np.array([1.0, 8.0, 27.0]), np.array([1.0, 2.0, 3.0]))
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] < 0.99


def test_mnli_two_dev_files(tmp_path):
    t = load(tmp_path, "mnli")
    assert (t.kind, t.num_labels) == ("classification", 3)
    assert t.label_names == ["entailment", "neutral", "contradiction"]
    assert [e.label for e in t.train] == [1, 0, 2]
    assert t.train[0].text_a == "Conceptually cream skimming." and t.train[0].text_b == "Product."
    assert set(t.eval) == {"matched", "mismatched"}
    assert [e.label for e in t.eval["matched"]] == [0, 2]
    assert [e.label for e in t.eval["mismatched"]] == [1, 1, 0]
    assert t.compute_metrics("matched", np.array([0, 2]), np.array([0, 2])) == {"accuracy": 1.0}
    m = t.compute_metrics("mismatched", np.array([1, 0, 0]), np.array([1, 1, 0]))
    assert m == {"accuracy_mm": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="matched"):
        t.compute_metrics("eval", np.array([0]), np.array([0]))


def test_qnli(tmp_path):
    t = load(tmp_path, "qnli")
    assert (t.kind, t.num_labels) == ("classification", 2)
    assert t.label_names == ["entailment", "not_entailment"]
    assert [e.label for e in t.train] == [0, 1]
    assert (t.train[0].text_a, t.train[0].text_b) == ("When?", "In 1990.")
    m = t.compute_metrics("eval", np.array([0, 0]), np.array([0, 1]))
    assert m == {"accuracy": pytest.approx(0.5)}


@pytest.mark.parametrize("task", ["rte", "wnli"])
def test_rte_wnli(tmp_path, task):
    t = load(tmp_path, task)
    assert (t.kind, t.num_labels, t.primary_metric) == ("classification", 2, "accuracy")
    yes = t.label_names.index("entailment")
    assert [e.label for e in t.train] == [yes, 1 - yes, yes]
    assert t.train[0].text_b == "Reeve is dead."
    assert len(t.eval["eval"]) == 2
    labels = np.array([e.label for e in t.eval["eval"]])
    assert t.compute_metrics("eval", labels, labels) == {"accuracy": 1.0}


def test_logits_accepted_for_classification(tmp_path):
    t = load(tmp_path, "sst2")
    logits = np.array([[2.0, -1.0], [0.1, 0.3]])
    assert t.compute_metrics("eval", logits, np.array([0, 1])) == {"accuracy": 1.0}


# --- names --------------------------------------------------------------------------------


def test_names_and_aliases():
    names = task_names()
    assert names[: 1 + len(GLUE)] == ["bbc-news", *(f"glue/{k}" for k in GLUE)]
    assert "e2e" in names
    for alias in ["sst2", "SST-2", "glue/sst-2", "GLUE/SST2", "glue_sst2"]:
        assert canonical_name(alias) == "glue/sst2"
    assert canonical_name("STS-B") == "glue/stsb"
    assert canonical_name("BBC-News") == "bbc-news"
    rows = list_tasks()
    assert [r["name"] for r in rows] == task_names()
    assert all(set(r) == {"name", "kind", "metrics", "source"} for r in rows)
    assert {r["name"]: r["metrics"] for r in rows}["glue/mnli"] == ["accuracy", "accuracy_mm"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        load_task(TaskConfig(name="glue/sst3"), 0)
    msg = str(info.value)
    assert "glue/sst3" in msg
    assert all(name in msg for name in task_names())


# --- bad input ------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name="glue/rte", data_dir=str(missing)), 0)
    assert str(missing) in str(info.value) and "train.tsv" in str(info.value)


def test_missing_file_named(tmp_path):
    d = make_fixture(tmp_path, "mnli")
    (d / "dev_mismatched.tsv").unlink()
    with pytest.raises(DataError, match="lacks dev_mismatched.tsv"):
        load_task(TaskConfig(name="glue/mnli", data_dir=str(d)), 0)


def test_no_data_dir_and_no_hub(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name="glue/cola"), 0)
    assert "task.data_dir" in str(info.value) and "shared/data/glue" in str(info.value)


def test_malformed_row_names_file_and_line(tmp_path):
    d = make_fixture(tmp_path, "rte")
    lines = (d / "train.tsv").read_text().splitlines()
    lines[2] = "1\tonly two columns"
    write(d, "train.tsv", lines)
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name="rte", data_dir=str(d)), 0)
    msg = str(info.value)
    assert str(d / "train.tsv") in msg and "line 3" in msg and "expected 4" in msg


def test_bad_label_names_file_line_and_valid_labels(tmp_path):
    d = make_fixture(tmp_path, "qnli")
    lines = (d / "dev.tsv").read_text().splitlines()
    lines.append(tsv("2", "How?", "Like so.", "maybe"))
    write(d, "dev.tsv", lines)
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name="qnli", data_dir=str(d)), 0)
    msg = str(info.value)
    assert "dev.tsv line 4" in msg and "'maybe'" in msg and "not_entailment" in msg


def test_bad_score(tmp_path):
    d = make_fixture(tmp_path, "stsb")
    lines = (d / "dev.tsv").read_text().splitlines()
    lines[1] = stsb_row(0, "a", "b", "high")
    write(d, "dev.tsv", lines)
    with pytest.raises(DataError, match=r"dev.tsv line 2: label 'high' is not a similarity score"):
        load_task(TaskConfig(name="stsb", data_dir=str(d)), 0)


def test_wrong_header(tmp_path):
    d = make_fixture(tmp_path, "sst2")
    write(d, "dev.tsv", ["text\tlabel", "fine\t1"])
    with pytest.raises(DataError, match="line 1.*sentence"):
        load_task(TaskConfig(name="sst2", data_dir=str(d)), 0)


def test_eval_only_when_asked(tmp_path):
    d = make_fixture(tmp_path, "qnli")
    (d / "train.tsv").unlink()
    with pytest.raises(DataError, match="lacks train.tsv"):
        load_task(TaskConfig(name="qnli", data_dir=str(d)), 0)
    t = load_task(TaskConfig(name="qnli", data_dir=str(d)), 0, require_train=False)
    assert t.train == [] and len(t.eval["eval"]) == 2


def _qnli_dev_only(tmp_path: Path, n: int = 40) -> Path:
    d = tmp_path / "QNLI"
    head = tsv("index", "question", "sentence", "label")
    rows = [
        tsv(str(i), f"Question {i}?", f"Sentence {i}.", "entailment" if i % 4 else "not_entailment")
        for i in range(n)
    ]
    write(d, "dev.tsv", [head, *rows])
    return d


def test_split_eval_trains_on_a_stratified_share_of_the_dev_file(tmp_path):
    d = _qnli_dev_only(tmp_path)  # 30 entailment (label 0), 10 not_entailment (label 1)
    cfg = TaskConfig(name="qnli", data_dir=str(d), split_eval=0.2)
    t = load_task(cfg, 0)
    held = t.eval["eval"]
    assert (len(t.train), len(held)) == (32, 8)
    assert sorted(ex.text_a for ex in t.train + held) == sorted(f"Question {i}?" for i in range(40))
    assert sum(ex.label for ex in held) == 2 and sum(ex.label for ex in t.train) == 8  # 20% each
    # the same held-out examples for every run seed (paired comparisons across seeds)
    assert [ex.text_a for ex in load_task(cfg, 7).eval["eval"]] == [ex.text_a for ex in held]
    assert "held out" in t.source


def test_split_eval_refuses_folders_with_train_data_or_several_eval_files(tmp_path):
    d = make_fixture(tmp_path, "qnli")  # has train.tsv
    with pytest.raises(ConfigError, match="split_eval is for glue/qnli folders without train.tsv"):
        load_task(TaskConfig(name="qnli", data_dir=str(d), split_eval=0.2), 0)
    m = make_fixture(tmp_path / "m", "mnli")
    (m / "train.tsv").unlink()
    with pytest.raises(ConfigError, match="one evaluation file"):
        load_task(TaskConfig(name="mnli", data_dir=str(m), split_eval=0.2), 0)


@pytest.mark.skipif(not (SHARED_GLUE / "QNLI" / "dev.tsv").is_file(), reason="no ../shared/data")
def test_split_eval_on_the_offline_qnli_dev_file():
    t = load_task(TaskConfig(name="qnli", data_dir=str(SHARED_GLUE / "QNLI"), split_eval=0.2), 0)
    assert (len(t.train), len(t.eval["eval"])) == (4371, 1092)  # of 5,463 dev pairs


# --- seeded subsampling -------------------------------------------------------------------


def test_subsampling_is_seeded(tmp_path):
    d = tmp_path / "big"
    write(
        d, "train.tsv", ["sentence\tlabel", *(f"train sentence {i}\t{i % 2}" for i in range(200))]
    )
    write(d, "dev.tsv", ["sentence\tlabel", *(f"dev sentence {i}\t{i % 2}" for i in range(100))])

    def texts(seed: int) -> tuple[list[str], list[str]]:
        cfg = TaskConfig(name="sst2", data_dir=str(d), max_train_examples=20, max_eval_examples=10)
        t = load_task(cfg, seed)
        return [e.text_a for e in t.train], [e.text_a for e in t.eval["eval"]]

    train0, eval0 = texts(0)
    assert len(train0) == 20 and len(set(train0)) == 20 and len(eval0) == 10
    assert texts(0) == (train0, eval0)
    train1, eval1 = texts(1)
    assert train1 != train0 and eval1 != eval0


def test_subsampling_each_mnli_split(tmp_path):
    d = make_fixture(tmp_path, "mnli")
    t = load_task(TaskConfig(name="mnli", data_dir=str(d), max_eval_examples=1), 0)
    assert {k: len(v) for k, v in t.eval.items()} == {"matched": 1, "mismatched": 1}
    assert len(t.train) == 3


# --- the real SST-2 copy --------------------------------------------------------------------

SST2_DIR = Path(__file__).parents[2] / "shared/data/glue/SST-2"


@pytest.mark.skipif(not SST2_DIR.is_dir(), reason="../shared/data/glue/SST-2 is not present")
def test_real_sst2():
    t = load_task(TaskConfig(name="glue/sst2", data_dir=str(SST2_DIR)), 0)
    assert len(t.train) == 67_349 and len(t.eval["eval"]) == 872
    assert sum(t.train_labels()) == 37_569
    assert t.train[0].text_a == "hide new secretions from the parental units"


# --- the HF hub path (with a stand-in `datasets` module: no network here) -----------------


class _FakeSplit:
    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, column: str) -> list:
        return self.columns[column]


def test_hub_columns_and_splits(monkeypatch):
    calls = []

    def load_dataset(path, config):
        calls.append((path, config))
        split = _FakeSplit({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0]})
        return {"train": split, "validation_matched": split, "validation_mismatched": split}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("cotune.data.glue._hub_unavailable", lambda: None)
    t = load_task(TaskConfig(name="glue/mnli"), 0)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert t.source == "hf:nyu-mll/glue"
    assert [(e.text_a, e.text_b, e.label) for e in t.train] == [("p1", "h1", 2), ("p2", "h2", 0)]
    assert set(t.eval) == {"matched", "mismatched"}


def test_hub_failure_is_a_data_error(monkeypatch):
    def load_dataset(path, config):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("cotune.data.glue._hub_unavailable", lambda: None)
    with pytest.raises(DataError, match="no route to host.*task.data_dir"):
        load_task(TaskConfig(name="glue/rte"), 0)
