"""The cut inversion attack: an honest-but-curious cloud maps the rows a split device
sends back to its input tokens. Without noise it recovers far more than a constant
guess can; with `[privacy]`-sized noise it falls to that floor; it refuses what it
does not cover."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_sst2

from cotune.attack import attack_config, attack_run
from cotune.cli.main import main
from cotune.config import build_config
from cotune.errors import ConfigError, DataError
from cotune.methods import resolve
from cotune.runtime.experiment import run_experiment

ATTACK = {"examples": 150, "public_sentences": 600, "steps": 250}


def _raw(data: Path, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "attack", "method": "split", "seed": 0,
        "task": {"name": "glue/sst2", "data_dir": str(data)},
        "model": {"name": "tiny-bert"}, "split": {"cut": 1},
        "train": {"steps": 4, "batch_size": 8, "max_seq_len": 24, "threads": 1},
    }  # fmt: skip
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("sst2"), n_train=200, n_dev=24)


def test_clean_cut_rows_give_the_tokens_back(data: Path) -> None:
    r = attack_config(build_config(_raw(data)), **ATTACK)
    assert r["device_rows"] > 500 and r["device_weights"] == "initial"
    # a constant guess (the most frequent public token) gets a few percent; the
    # inverter reads most of the words off the rows
    assert r["floor_majority"] < 0.15
    assert r["token_recovery"] > 0.35
    assert r["token_recovery"] > 4 * r["floor_majority"]
    assert r["floor_untrained"] < r["token_recovery"] / 2
    assert r["informative_recovery"] is not None and r["informative_tokens"]


def test_int8_cut_leaks_as_much_as_the_float_cut(data: Path) -> None:
    clean = attack_config(build_config(_raw(data)), **ATTACK)
    int8 = attack_config(build_config(_raw(data, link={"codec": "int8"})), **ATTACK)
    assert abs(int8["token_recovery"] - clean["token_recovery"]) < 0.1


def test_noise_drives_recovery_to_the_floor(data: Path) -> None:
    r = attack_config(build_config(_raw(data)), noise_std=5.0, **ATTACK)
    assert r["noise_std"] == 5.0 and r["clip"] == 1.0
    assert r["token_recovery"] < r["floor_majority"] + 0.05


def test_a_finished_split_run_is_attacked_with_its_trained_device(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_experiment(resolve(build_config(_raw(data))), tmp_path / "run")
    assert main(["attack", str(run), "--steps", "200", "--examples", "100"]) == 0
    written = json.loads((run / "attack.json").read_text())
    assert written["device_weights"] == "trained" and written["cut"] == 1
    assert written["token_recovery"] > 3 * written["floor_majority"]
    assert "exact tokens recovered" in capsys.readouterr().out


def test_what_the_attack_does_not_cover_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pca"):
        attack_config(build_config(_raw(data, link={"codec": "pca"})), **ATTACK)
    with pytest.raises(DataError, match="not a run folder"):
        attack_run(tmp_path)
    raw = _raw(data, method="centralized")
    del raw["split"]
    run = run_experiment(resolve(build_config(raw)), tmp_path / "central")
    with pytest.raises(ConfigError, match="'centralized' run"):
        attack_run(run)
    assert main(["attack", str(run)]) == 2


def test_gradient_directions_give_the_labels_away() -> None:
    # a constructed U-shaped case: the gradient of a softmax head's loss w.r.t. the
    # pooled features is J^T (p - onehot(y)); its sign along w1 - w0 is set by y
    from cotune.attack.label_leak import gradient_label_attack

    g = torch.Generator().manual_seed(0)
    n, width = 400, 32
    labels = (torch.rand(n, generator=g) < 0.7).long()  # 70% ones: the floor
    w = torch.randn(2, width, generator=g)
    p1 = torch.rand(n, generator=g)
    coef = p1 - labels.float()  # d loss / d logit_1 (= -d / d logit_0)
    grads = coef[:, None] * (w[1] - w[0]) + 0.05 * torch.randn(n, width, generator=g)
    guess = gradient_label_attack(grads, 2, prior=[1, 0])
    accuracy = float((guess == labels).float().mean())
    assert accuracy > 0.95 > 0.7
    # named by the wrong prior, the same clusters are the labels flipped
    flipped = gradient_label_attack(grads, 2, prior=[0, 1])
    assert float((flipped == labels).float().mean()) < 0.05
    # gradients that carry no label: the attack is no better than the floor
    blind = gradient_label_attack(torch.randn(n, width, generator=g), 2, prior=[1, 0])
    assert float((blind == labels).float().mean()) < 0.8


def test_a_u_shaped_run_leaks_its_labels_through_the_gradient(data: Path, tmp_path: Path) -> None:
    from cotune.runtime.curious_cloud import label_leak

    cloud = label_leak(build_config(_raw(data)), tmp_path / "cloud")
    assert cloud["label_recovery"] == 1.0 and cloud["labels"] == "cloud"
    raw = _raw(data, split={"labels": "device"},
               train={"steps": 12, "batch_size": 8, "lr": 1e-3})  # fmt: skip
    r = label_leak(build_config(raw), tmp_path / "device")
    assert r["labels"] == "device" and r["examples"] == 96 and r["steps"] == 12
    assert r["floor_majority"] < 0.75
    assert r["label_recovery"] > r["floor_majority"] + 0.15
    # the run itself went through: a finished run folder
    assert (tmp_path / "device" / "summary.json").is_file()
