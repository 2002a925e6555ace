"""`cotune device --data PATH`: a split device trains on its own file, not on data the
cloud (or the shared config) names; a missing file or the wrong columns stop it with
status 2 before it connects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from helpers import expected_sha, node_rows, write_rows

from cotune.cli.main import main
from cotune.config import build_config, to_toml
from cotune.link.auth import write_token_file
from cotune.runtime.launcher import free_port

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp: Path, eval_file: Path) -> Path:
    """A split config for a csv task that names no training data: only the device's own
    evaluation file (so every row of --data is a training row)."""
    tokens = tmp / "tokens"
    write_token_file(tokens, [0])
    raw: dict[str, Any] = {
        "name": "device-data", "method": "split", "seed": 1,
        "task": {"name": "csv", "eval_file": str(eval_file)},
        "model": {"name": "tiny-bert"},
        "train": {"steps": 2, "batch_size": 4, "max_seq_len": 16, "threads": 1},
        "split": {"cut": 1, "labels": "cloud"},
        "runtime": {"tokens": str(tokens), "connect_timeout_s": 900},
    }  # fmt: skip
    path = tmp / "split.toml"
    path.write_text(to_toml(build_config(raw)))
    return path


@pytest.mark.slow
def test_device_trains_on_the_file_given_with_data(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rows = node_rows(4, 9)
    mine = write_rows(tmp_path / "device" / "mine.csv", rows)
    cfg_path = _config(tmp_path, write_rows(tmp_path / "device" / "dev.csv", node_rows(8, 4)))
    address = f"127.0.0.1:{free_port()}"
    cloud = subprocess.Popen(
        [sys.executable, "-m", "cotune", "cloud", "--config", str(cfg_path), "--listen", address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        code = main(
            ["device", "--config", str(cfg_path), "--cloud", address, "--data", str(mine),
             "--out", str(tmp_path / "run")]
        )  # fmt: skip
    finally:
        cloud.terminate()
        out, _ = cloud.communicate(timeout=120)
    assert code == 0, capsys.readouterr().err + out.decode()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    data = summary["train_data"]
    assert data["examples"] == len(rows) and data["sha256"] == expected_sha(rows)
    assert data["source"].startswith(str(mine))
    assert summary["steps"] == 2 and "accuracy" in summary["metrics"]
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert saved["task"]["train_file"] == str(mine)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("absent.csv", "absent.csv' does not exist"),
        ("wrong.csv", "no column 'text' (task.text_column); its columns: review, label"),
    ],
)
def test_device_data_errors_exit_2(tmp_path: Path, capsys, data: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    write_rows(tmp_path / "wrong.csv", node_rows(1, 4), header=("review", "label"))
    cfg_path = _config(tmp_path, write_rows(tmp_path / "dev.csv", node_rows(8, 4)))
    code = main(
        ["device", "--config", str(cfg_path), "--cloud", "127.0.0.1:9", "--data",
         str(tmp_path / data), "--out", str(tmp_path / "run")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_splitfed_devices_each_train_on_all_of_their_own_data(tmp_path: Path) -> None:
    """Three splitfed devices (threads against one in-process cloud), each configured as
    `cotune device --data` configures it: each trains on all of its own folder, not on a
    partition of a shared one."""
    import threading

    from helpers import splitfed_config, write_e2e

    from cotune.data import load_task
    from cotune.data.registry import fingerprint
    from cotune.errors import ConfigError
    from cotune.link.auth import TokenBook
    from cotune.link.service import CloudEndpoint
    from cotune.methods import NullRecorder, get_spec
    from cotune.methods.spec import SplitSpec
    from cotune.runtime.experiment import use_own_data
    from cotune.runtime.split.launch import inprocess_connector

    shared = write_e2e(tmp_path / "shared", n_train=2)  # what the config names
    with pytest.raises(ConfigError, match="train.steps"):
        use_own_data(splitfed_config(shared, train={"steps": None, "epochs": 1.0}), shared)
    sizes = {0: 3, 1: 5, 2: 7}
    cfgs = {
        i: use_own_data(
            splitfed_config(shared, train={"steps": 2}), write_e2e(tmp_path / f"d{i}", n_train=n)
        )
        for i, n in sizes.items()
    }
    spec = get_spec("splitfed").runs
    assert isinstance(spec, SplitSpec)
    tokens = {i: f"token-{i}" for i in sizes}
    endpoint = CloudEndpoint(spec.cloud(cfgs[0]), TokenBook(tokens))
    results: dict[int, Any] = {}

    def work(i: int) -> None:
        connect = inprocess_connector(cfgs[i], endpoint, i, tokens[i])
        results[i] = spec.device(cfgs[i], i, connect, NullRecorder(), None)

    threads = [threading.Thread(target=work, args=(i,)) for i in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(results) == [0, 1, 2]
    for i, n in sizes.items():
        extra = results[i].extra
        own = load_task(cfgs[i].task, cfgs[i].seed)  # the folder's rows, read plainly
        assert extra["examples"] == n == len(own.train)
        assert extra["train_sha256"] == fingerprint(own.train, own)
        assert extra["steps"] == 2 and extra["rounds"] == [3, 3]
