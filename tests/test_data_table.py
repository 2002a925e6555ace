"""A user's own data: csv / json / hf:<id> / text-folder tasks, config-relative paths, and
malformed input -> DataError naming the file and line (exit 2, no run folder)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from cotune.config import load_config
from cotune.config.schema import TaskConfig
from cotune.data import load_task
from cotune.errors import ConfigError, DataError

POS = ["great", "lovely", "superb", "wonderful"]
NEG = ["awful", "dull", "boring", "terrible"]


def _csv(path: Path, n: int = 40, label_names: tuple[str, str] = ("neg", "pos")) -> Path:
    lines = ["review,stars,sentiment"]
    for i in range(n):
        good = i % 2 == 0
        word = (POS if good else NEG)[i % 4]
        lines.append(f'"a {word} film, number {i}",{4 if good else 1},{label_names[good]}')
    path.write_text("\n".join(lines) + "\n")
    return path


def _task(**kw) -> TaskConfig:  # type: ignore[no-untyped-def]
    return TaskConfig(**{"text_column": "review", "label_column": "sentiment", **kw})


def test_csv_classification_holds_out_the_same_rows_for_every_seed(tmp_path: Path) -> None:
    path = _csv(tmp_path / "reviews.csv")
    t0 = load_task(_task(name="csv", train_file=str(path)), seed=0)
    t1 = load_task(_task(name="csv", train_file=str(path)), seed=1)
    assert t0.kind == "classification" and t0.label_names == ["neg", "pos"]
    assert len(t0.train) == 32 and len(t0.eval["eval"]) == 8  # test_fraction 0.2
    assert [e.text_a for e in t0.eval["eval"]] == [e.text_a for e in t1.eval["eval"]]
    assert not {e.text_a for e in t0.train} & {e.text_a for e in t0.eval["eval"]}
    assert sorted(e.label for e in t0.eval["eval"]) == [0] * 4 + [1] * 4  # stratified
    assert t0.eval["eval"][0].text_a.startswith("a ")  # the quoted comma stays in the text


def test_csv_numeric_labels_sort_as_numbers_and_eval_file(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"t{i},{[2, 10, 1][i % 3]}\n" for i in range(9)))
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nx,10\ny,1\n")
    t = load_task(TaskConfig(name="csv", data_dir=str(tmp_path)), seed=0)  # finds train/dev
    assert t.label_names == ["1", "2", "10"]
    assert [e.label for e in t.eval["eval"]] == [2, 0]
    assert len(t.train) == 9


def test_regression_and_text_pairs_from_tsv(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tb\tscore\n" + "".join(f"s{i}\tt{i}\t{i / 2}\n" for i in range(10)))
    cfg = TaskConfig(name="tsv", train_file=str(path), text_column="a", text_pair_column="b",
                     label_column="score", problem="regression", split_eval=0.3)  # fmt: skip
    t = load_task(cfg, seed=0)
    assert t.kind == "regression" and t.num_labels == 1 and t.primary_metric == "spearman"
    assert len(t.eval["eval"]) == 3
    ex = t.train[0]
    assert ex.text_b == "t" + ex.text_a[1:] and ex.label == int(ex.text_a[1:]) / 2


def test_jsonl_generation_groups_references_and_holds_out_whole_prompts(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    rows = [{"src": f"item {i % 10}", "tgt": f"text {i}"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = TaskConfig(name="jsonl", train_file=str(path), text_column="src", target_column="tgt")
    t = load_task(cfg, seed=0)
    assert t.kind == "generation" and t.primary_metric == "bleu"
    prompts = [e.text_a for e in t.eval["eval"]]
    assert len(prompts) == 2 and all(len(refs) == 3 for refs in t.references["eval"])  # type: ignore[attr-defined]
    assert not set(prompts) & {e.text_a for e in t.train}
    assert len(t.train) == 24 and all(e.text_b.startswith("text ") for e in t.train)


def test_json_array_and_label_only_in_eval(tmp_path: Path) -> None:
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"text": f"t{i}", "label": i % 2} for i in range(6)]))
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps([{"text": "x", "label": 0}, {"text": "y", "label": 7}]))
    cfg = TaskConfig(name="json", train_file=str(train), eval_file=str(dev))
    with pytest.raises(DataError, match=r"dev.json item 1: label '7' appears in the evaluation"):
        load_task(cfg, seed=0)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("review,sentiment\n", "has a header but no rows"),
        ("", "is empty"),
        ("review,stars\na,1\n", r"bad.csv line 2: no column 'sentiment' \(task.label_column\); its columns: review, stars"),
        ("review,sentiment\na,pos\nb,neg,extra\n", r"bad.csv line 3: 3 field\(s\) where the header has 2"),
        ("review,sentiment\na,pos\nb,\n", r"bad.csv line 3: column 'sentiment' \(task.label_column\) is empty"),
    ],
)  # fmt: skip
def test_malformed_csv_names_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_task(_task(name="csv", train_file=str(path)), seed=0)


def test_non_utf8_and_non_numeric_regression_label(tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nok,1\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv line 3: not UTF-8 text \(byte 0xe9"):
        load_task(TaskConfig(name="csv", train_file=str(latin)), seed=0)
    reg = tmp_path / "reg.csv"
    reg.write_text("text,label\na,1.5\nb,high\n")
    with pytest.raises(DataError, match=r"reg.csv line 3: column 'label' = 'high' is not a number"):
        load_task(TaskConfig(name="csv", train_file=str(reg), problem="regression"), seed=0)


def test_bad_json_lines_and_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(DataError, match=r"x.jsonl line 2: invalid JSON"):
        load_task(TaskConfig(name="json", train_file=str(path)), seed=0)
    with pytest.raises(ConfigError, match="needs task.train_file"):
        load_task(TaskConfig(name="csv"), seed=0)
    with pytest.raises(ConfigError, match=r"task 'csv' reads .csv, .tsv files"):
        load_task(TaskConfig(name="csv", train_file=str(path)), seed=0)
    with pytest.raises(ConfigError, match="needs task.target_column"):
        load_task(TaskConfig(name="json", train_file=str(path), problem="generation"), seed=0)
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="1 distinct label"):
        load_task(TaskConfig(name="csv", train_file=str(one)), seed=0)


def _folder(root: Path, classes: dict[str, int]) -> Path:
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.txt").write_text(f"{name} text number {i}\n")
    return root


def test_text_folder_layouts_and_errors(tmp_path: Path) -> None:
    flat = _folder(tmp_path / "flat", {"sport": 5, "tech": 5})
    t = load_task(TaskConfig(name="text-folder", data_dir=str(flat)), seed=3)
    assert t.label_names == ["sport", "tech"] and len(t.train) == 8 and len(t.eval["eval"]) == 2
    assert all(e.text_a.startswith(t.label_names[e.label]) for e in t.train + t.eval["eval"])
    both = tmp_path / "both"
    _folder(both / "train", {"a": 3, "b": 3})
    _folder(both / "test", {"a": 1, "b": 2})
    t = load_task(TaskConfig(name="textfolder", data_dir=str(both)), seed=0)
    assert (len(t.train), len(t.eval["eval"])) == (6, 3)
    with pytest.raises(DataError, match="1 class folder"):
        load_task(
            TaskConfig(name="text-folder", data_dir=str(_folder(tmp_path / "one", {"a": 3}))), 0
        )
    (flat / "tech" / "bad.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8"):
        load_task(TaskConfig(name="text-folder", data_dir=str(flat)), seed=0)


def test_hf_task_from_a_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")  # a dev dependency: present wherever tests run
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["bad", "good"])}
    )
    rows = {"sentence": [f"s{i}" for i in range(8)], "label": [i % 2 for i in range(8)]}
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows, features=features),
            "validation": datasets.Dataset.from_dict(
                {"sentence": ["v0", "v1"], "label": [1, 0]}, features=features
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = TaskConfig(
        name="hf:my/sentiment", data_dir=str(tmp_path / "saved"), text_column="sentence"
    )
    t = load_task(cfg, seed=0)
    assert t.name == "hf:my/sentiment" and t.label_names == ["bad", "good"]
    assert len(t.train) == 8 and [e.label for e in t.eval["eval"]] == [1, 0]
    with pytest.raises(ConfigError, match="task.eval_split 'test' is not a split"):
        load_task(cfg.model_copy(update={"eval_split": "test"}), seed=0)


def test_paths_in_a_config_file_are_relative_to_its_folder(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "data").mkdir()
    config = project / "configs" / "run.toml"
    config.write_text('[task]\nname = "csv"\ndata_dir = "../data"\ntrain_file = "t.csv"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config)
    assert cfg.task.data_dir == str(project / "data")
    assert cfg.task.train_file == str(project / "configs" / "t.csv")
    # --set values are relative to the current directory
    cfg = load_config(config, ["task.data_dir=mine"])
    assert cfg.task.data_dir == str(elsewhere / "mine")
    # a path written for the current directory (the old rule) still loads, with a warning
    (elsewhere / "old").mkdir()
    config.write_text('[task]\nname = "csv"\ndata_dir = "old"\n')
    with pytest.warns(UserWarning, match="relative to the config file's folder"):
        cfg = load_config(config)
    assert cfg.task.data_dir == os.path.abspath(elsewhere / "old")


# --- the command line, from a directory other than the repository -------------------------


def _cli(args: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    from cotune.cli.main import main

    code = main(args)
    return code, capsys.readouterr().err


TINY = ["--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "train.max_seq_len=24"]


def test_cli_runs_a_users_csv_jsonl_and_text_folder(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    _csv(project / "data" / "reviews.csv")
    rows = [{"src": f"name[{w}]", "tgt": f"{w} is a pub."} for w in ("red", "blue", "gold") * 4]
    (project / "data" / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _folder(project / "data" / "topics", {"sport": 6, "tech": 6})
    configs = {
        "csv.toml": '[task]\nname = "csv"\ntrain_file = "data/reviews.csv"\n'
        'text_column = "review"\nlabel_column = "sentiment"\n[model]\nname = "tiny-bert"\n',
        "gen.toml": '[task]\nname = "json"\ntrain_file = "data/gen.jsonl"\ntext_column = "src"\n'
        'target_column = "tgt"\n[model]\nname = "tiny-llama"\nlora = { r = 2 }\n'
        "[generation]\nmax_new_tokens = 4\nnum_beams = 1\n",
        "folder.toml": '[task]\nname = "text-folder"\ndata_dir = "data/topics"\n'
        '[model]\nname = "tiny-bert"\n',
    }
    for name, text in configs.items():
        (project / name).write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name, kind in (("csv.toml", "accuracy"), ("gen.toml", "bleu"), ("folder.toml", "accuracy")):
        out = elsewhere / name.removesuffix(".toml")
        code, err = _cli(["run", str(project / name), *TINY, "--out", str(out)], capsys)
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert kind in summary["metrics"], summary["metrics"]
        saved = load_config(out / "config.toml")  # the saved config runs again from anywhere
        assert Path(saved.task.data_dir or saved.task.train_file or "").is_absolute()


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("review,stars\na,1\nb,2\n", "line 2: no column 'sentiment'"),
        ("review,sentiment\na,pos\nb,neg,3\n", "line 3: 3 field(s)"),
        ("", "is empty"),
    ],
)
def test_cli_bad_csv_exits_2_and_writes_no_run_folder(
    tmp_path: Path,
    monkeypatch,
    capsys,
    content: str,
    where: str,  # type: ignore[no-untyped-def]
) -> None:
    (tmp_path / "d.csv").write_text(content)
    (tmp_path / "c.toml").write_text(
        '[task]\nname = "csv"\ntrain_file = "d.csv"\ntext_column = "review"\n'
        'label_column = "sentiment"\n[model]\nname = "tiny-bert"\n'
    )
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["run", "c.toml", *TINY], capsys)
    assert code == 2 and where in err and "Traceback" not in err
    assert str(tmp_path / "d.csv") in err
    assert not (tmp_path / "runs").exists()


REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted([*REPO.glob("examples/*.toml"), *REPO.glob("benchmarks/configs/*.toml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_resolve_their_data_from_any_directory(
    path: Path, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from cotune.runtime.experiment import load_experiment

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_experiment(path)
    assert not [w for w in caught if "config file's folder" in str(w.message)]
    for value in (cfg.task.data_dir, cfg.task.train_file, cfg.task.eval_file):
        if value is not None:
            assert Path(value).exists(), f"{path.name}: {value} does not exist"


def test_generic_examples_load_their_real_data() -> None:
    from cotune.runtime.experiment import load_experiment

    sst2 = load_task(load_experiment(REPO / "examples" / "sst2-as-csv.toml").task, seed=0)
    assert sst2.label_names == ["0", "1"] and len(sst2.eval["eval"]) == 872
    e2e = load_task(load_experiment(REPO / "examples" / "e2e-as-csv.toml").task, seed=0)
    assert e2e.kind == "generation" and len(e2e.eval["eval"]) == 20
    assert all(len(refs) >= 1 for refs in e2e.references["eval"])  # type: ignore[attr-defined]


def test_own_data_examples_read_the_files_their_script_writes(tmp_path: Path) -> None:
    """examples/own-data: make_files.py writes E2E as JSON lines and BBC News as a text
    folder; the two configs beside it load them as a generation and a text-folder task."""
    import runpy
    import shutil

    from cotune.runtime.experiment import load_experiment

    folder = REPO / "examples" / "own-data"
    for name in ("e2e-jsonl.toml", "bbc-text-folder.toml"):
        shutil.copy(folder / name, tmp_path / name)
    script = runpy.run_path(str(folder / "make_files.py"))
    script["main"](["--out", str(tmp_path / "data")])
    e2e = load_task(load_experiment(tmp_path / "e2e-jsonl.toml").task, seed=0)
    assert e2e.kind == "generation" and len(e2e.train) == 2000 and len(e2e.eval["eval"]) == 50
    refs = e2e.references["eval"]  # type: ignore[attr-defined]
    assert min(map(len, refs)) >= 1 and sum(map(len, refs)) > 2 * len(refs)  # grouped
    bbc = load_task(load_experiment(tmp_path / "bbc-text-folder.toml").task, seed=0)
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(bbc.train) + sum(len(v) for v in bbc.eval.values()) == 2225
