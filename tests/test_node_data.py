"""Each device trains on its own data (`federated.client_data = "node"`, `--data`).

Data layer: `load_task(part="train")` reads a node's own file or folder whole (nothing
held out, one class is enough), `part="eval"` reads the evaluation data alone (the
training file is never opened), `task.labels` fixes the classes, `with_data_path`
points a task at a node's path. Federated (inline engine, tiny-bert): every client
trains on exactly its own rows, the server gets no training path, unites the nodes'
classes, evaluates on its own eval file or, without one, by a federated evaluation on
the nodes' data; a node with no usable data stops the run with a clear user error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import expected_sha, node_files, node_rows, write_rows, write_sst2

from cotune.config import build_config
from cotune.config.schema import TaskConfig
from cotune.data.registry import fingerprint, load_task, with_data_path
from cotune.errors import ConfigError, DataError, UserError
from cotune.methods import resolve
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.engine import run_federated

# --------------------------------------------------------------------------- data layer


def test_a_nodes_file_is_all_training_rows_and_may_hold_one_class(tmp_path: Path) -> None:
    rows = node_rows(0, 7)
    cfg = with_data_path(TaskConfig(name="csv"), write_rows(tmp_path / "a.csv", rows))
    task = load_task(cfg, 0, part="train")
    assert len(task.train) == 7 and task.eval == {}  # nothing held out
    assert fingerprint(task.train, task) == expected_sha(rows)
    one = write_rows(tmp_path / "b.csv", node_rows(1, 3, ("pos",)))
    single = load_task(with_data_path(TaskConfig(name="csv"), one), 0, part="train")
    assert single.label_names == ["pos"] and len(single.train) == 3
    with pytest.raises(DataError, match="at least 2"):  # a whole run still needs two
        load_task(with_data_path(TaskConfig(name="csv"), one), 0)


def test_task_labels_fix_the_class_indices(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "a.csv", node_rows(0, 4, ("pos",)))
    cfg = with_data_path(TaskConfig(name="csv", labels=["neg", "pos"]), path)
    task = load_task(cfg, 0, part="train")
    assert task.label_names == ["neg", "pos"] and {ex.label for ex in task.train} == {1}
    bad = with_data_path(TaskConfig(name="csv", labels=["x", "y"]), path)
    with pytest.raises(DataError, match=r"a\.csv line 2: label 'pos' is not one of task\.labels"):
        load_task(bad, 0, part="train")
    with pytest.raises(ConfigError, match="task.labels"):  # GLUE fixes its own classes
        load_task(TaskConfig(name="glue/sst2", data_dir=str(tmp_path), labels=["a", "b"]), 0)


def test_the_eval_part_never_reads_the_training_file(tmp_path: Path) -> None:
    ev = write_rows(tmp_path / "dev.csv", [("ok film", "pos"), ("bad film", "neg")])
    missing = tmp_path / "no-such-train.csv"  # opening it would fail
    cfg = TaskConfig(name="csv", train_file=str(missing), eval_file=str(ev), labels=["neg", "pos"])
    task = load_task(cfg, 0, part="eval")
    assert task.train == [] and [ex.label for ex in task.eval["eval"]] == [1, 0]
    none = load_task(TaskConfig(name="csv", train_file=str(missing)), 0, part="eval")
    assert none.eval == {}  # held-out rows are training rows: no eval set of its own
    glue = write_sst2(tmp_path / "glue", n_train=10, n_dev=6)
    (glue / "train.tsv").unlink()
    sst = load_task(TaskConfig(name="sst2", data_dir=str(glue)), 0, part="eval")
    assert sst.train == [] and len(sst.eval["eval"]) == 6


def test_the_eval_part_of_a_datasets_folder_skips_its_train_split(tmp_path: Path) -> None:
    import shutil

    datasets = pytest.importorskip("datasets")
    splits = {
        "train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}),
        "test": datasets.Dataset.from_dict({"text": ["c", "d", "e"], "label": [1, 0, 1]}),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    node = load_task(with_data_path(TaskConfig(name="hf:x"), tmp_path / "hf"), 0, part="train")
    assert len(node.train) == 2 and node.eval == {}
    shutil.rmtree(tmp_path / "hf" / "train")  # the server must not need it
    cfg = TaskConfig(name="hf:x", data_dir=str(tmp_path / "hf"), labels=["0", "1"])
    task = load_task(cfg, 0, part="eval")
    assert task.train == [] and [ex.label for ex in task.eval["eval"]] == [1, 0, 1]


def test_text_and_glue_folders_as_a_nodes_data(tmp_path: Path) -> None:
    for name, texts in (("happy", ["a good day", "fun times"]), ("sad", ["a bad day"])):
        (tmp_path / "tf" / name).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "tf" / name / f"{i}.txt").write_text(text)
    task = load_task(
        with_data_path(TaskConfig(name="text-folder"), tmp_path / "tf"), 0, part="train"
    )
    assert len(task.train) == 3 and task.label_names == ["happy", "sad"] and task.eval == {}
    glue = write_sst2(tmp_path / "glue", n_train=12, n_dev=4)
    (glue / "dev.tsv").unlink()  # a node needs train.tsv only
    sst = load_task(with_data_path(TaskConfig(name="sst2"), glue), 0, part="train")
    assert len(sst.train) == 12 and sst.eval == {}


def test_with_data_path_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        with_data_path(TaskConfig(name="csv"), tmp_path / "absent.csv")
    (tmp_path / "f.tsv").write_text("x")
    with pytest.raises(DataError, match="reads a folder"):
        with_data_path(TaskConfig(name="sst2"), tmp_path / "f.tsv")


# ----------------------------------------------------------------- federated, inline


def fed_config(eval_file: Path | None, **federated: object):  # type: ignore[no-untyped-def]
    task: dict[str, object] = {"name": "csv"}
    if eval_file is not None:
        task["eval_file"] = str(eval_file)
    raw = {
        "name": "own-data", "method": "fedlora", "seed": 0, "task": task,
        "model": {"name": "tiny-bert"},
        "train": {"batch_size": 4, "max_seq_len": 16, "threads": 1},
        "federated": {"clients": 3, "rounds": 1, "local_steps": 1, "client_data": "node",
                      **federated},
    }  # fmt: skip
    return resolve(build_config(raw))


def test_each_inline_client_trains_on_exactly_its_own_rows(tmp_path: Path) -> None:
    files, rows = node_files(tmp_path)
    ev = write_rows(tmp_path / "server" / "dev.csv", node_rows(9, 6))
    cfg = fed_config(ev)
    assert cfg.task.train_file is None and cfg.task.data_dir is None  # no training path
    result = run_federated(
        cfg, tmp_path / "run", engine="inline", node_configs=[{"data-path": str(f)} for f in files]
    )
    events = read_jsonl(tmp_path / "run" / "train.jsonl")
    nodes = {e["data_path"]: e for e in events if e["event"] == "node"}
    assert set(nodes) == {str(f) for f in files}
    trained = {e["partition"]: e for e in events if e["event"] == "client_trained"}
    assert sorted(trained) == [0, 1, 2]
    for f, r in zip(files, rows, strict=True):
        node = nodes[str(f)]
        assert node["examples"] == len(r) and node["data_sha256"] == expected_sha(r)
        mine = trained[node["partition"]]  # what it reported after training
        assert mine["examples"] == len(r) and mine["data_sha256"] == expected_sha(r)
    assert nodes[str(files[2])]["labels"] == ["pos"]
    assert result.extra["client_data"] == "node" and result.extra["evaluated_on"] == "server"
    assert "accuracy" in result.metrics  # scored on the server's own dev.csv
    assert len(read_jsonl(tmp_path / "run" / "predictions.jsonl")) == 6


def test_without_server_eval_data_the_clients_evaluate(tmp_path: Path) -> None:
    files, rows = node_files(tmp_path)
    result = run_federated(
        fed_config(None), tmp_path / "run", engine="inline",
        node_configs=[{"data-path": str(f)} for f in files],
    )  # fmt: skip
    assert result.extra["evaluated_on"] == "clients"
    assert result.metrics["eval_clients"] == 3.0
    assert result.metrics["eval_examples"] == float(sum(len(r) for r in rows))
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["eval_clients"] == 3.0 and "accuracy" in record


@pytest.mark.parametrize(
    ("node", "needle"),
    [
        ({}, "has no 'data-path' in its node config"),
        ({"data-path": "/no/such/file.csv"}, "'/no/such/file.csv' does not exist"),
        ("wrong-columns", "no column 'text' (task.text_column); its columns: sentence, label"),
    ],
)
def test_a_node_without_usable_data_is_a_user_error(
    tmp_path: Path, node: dict[str, str] | str, needle: str
) -> None:
    files, _ = node_files(tmp_path)
    if node == "wrong-columns":
        bad = write_rows(tmp_path / "bad.csv", node_rows(5, 3), header=("sentence", "label"))
        node = {"data-path": str(bad)}
    configs: list[dict[str, str | int | float | bool]] = [
        {"data-path": str(files[0])},
        {"data-path": str(files[1])},
        dict(node),  # type: ignore[arg-type]
    ]
    ev = write_rows(tmp_path / "dev.csv", node_rows(9, 4))
    with pytest.raises(UserError) as err:
        run_federated(fed_config(ev), tmp_path / "run", engine="inline", node_configs=configs)
    assert needle in str(err.value) and "cannot train on their own data" in str(err.value)
    assert not (tmp_path / "run" / "federated_result.json").exists()


def test_own_data_needs_nodes_that_have_it(tmp_path: Path) -> None:
    ev = write_rows(tmp_path / "dev.csv", node_rows(9, 4))
    with pytest.raises(ConfigError, match="data-path"):
        run_federated(fed_config(ev), tmp_path / "run", engine="simulation")
    deploy = build_config(
        {"method": "fedlora", "runtime": {"engine": "deployment", "superlink": "10.0.0.1:9092"}}
    )
    assert deploy.federated.client_data == "node"  # a SuperLink of the user's: always
    with pytest.raises(ConfigError, match="public share"):
        resolve(build_config({"method": "fedkd", "federated": {"client_data": "node"}}))
