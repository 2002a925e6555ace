"""`runtime.device`: where the cloud side computes (CPU here; CUDA tests skip without one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cotune.cli.main import main
from cotune.errors import ConfigError
from cotune.training import placement
from cotune.training.placement import cloud_device, resolve_device, to_device
from tests.helpers import write_sst2

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False)"


def test_cpu_and_auto_resolve_to_the_cpu_without_a_gpu(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(placement, "_cuda_count", lambda: 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_auto_picks_the_first_gpu_when_there_is_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(placement, "_cuda_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_cuda_without_a_gpu_says_why_and_what_is_valid(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(placement, "_cuda_count", lambda: 0)
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    msg = str(err.value)
    assert "runtime.device = 'cuda'" in msg and 'valid here: "cpu" or "auto"' in msg
    assert ("built without CUDA" in msg) == (torch.version.cuda is None)


def test_gpu_index_past_the_last_one_lists_the_valid_range(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(placement, "_cuda_count", lambda: 2)
    with pytest.raises(ConfigError, match=r'has 2 GPU\(s\).*"cuda:0".."cuda:1"'):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "mps", ""])
def test_not_a_device(bad: str) -> None:
    with pytest.raises(ConfigError, match="valid"):
        resolve_device(bad)


def test_sparse_memory_modes_need_the_cpu(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(placement, "_cuda_count", lambda: 1)
    with pytest.raises(ConfigError, match="memory.backward = 'backrazor'.*CPU kernels"):
        cloud_device("cuda", "backrazor")
    assert cloud_device("cuda", "none") == torch.device("cuda", 0)
    assert cloud_device("cpu", "backrazor") == torch.device("cpu")


def test_cpu_path_moves_nothing() -> None:
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.zeros(2), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert all(moved[k] is batch[k] for k in batch)  # the same objects: no copy


def _run(args: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    try:
        code = main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _centralized_args(data: Path, out: Path, device: str) -> list[str]:
    return [
        "run",
        "--set", "task.name=glue/sst2",
        "--set", f"task.data_dir={json.dumps(str(data))}",
        "--set", "model.name=tiny-bert",
        "--set", "train.steps=4",
        "--set", "train.batch_size=4",
        "--set", f"runtime.device={json.dumps(device)}",
        "--out", str(out),
    ]  # fmt: skip


def test_config_rejects_a_device_that_is_not_one(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, err = _run(_centralized_args(write_sst2(tmp_path), tmp_path / "r", "gpu"), capsys)
    assert code == 2 and "runtime.device" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: cuda is valid here")
def test_cuda_on_this_machine_exits_2_before_training(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, err = _run(_centralized_args(write_sst2(tmp_path), tmp_path / "r", "cuda"), capsys)
    assert code == 2 and "runtime.device = 'cuda'" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_auto_on_the_cpu_reports_where_it_computed(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = write_sst2(tmp_path)
    code, err = _run(_centralized_args(data, tmp_path / "auto", "auto"), capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    expected = "cuda:0" if HAS_CUDA else "cpu"
    assert summary["compute_device"] == expected


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_centralized_on_the_gpu_matches_the_cpu(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = write_sst2(tmp_path)
    results = {}
    for device in ("cpu", "cuda"):
        code, err = _run(_centralized_args(data, tmp_path / device, device), capsys)
        assert code == 0, err
        results[device] = json.loads((tmp_path / device / "summary.json").read_text())
    assert results["cuda"]["cuda_peak_bytes"] > 0
    assert results["cuda"]["metrics"]["loss"] == pytest.approx(
        results["cpu"]["metrics"]["loss"], rel=1e-2
    )
