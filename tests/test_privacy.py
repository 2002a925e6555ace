"""[privacy]: clipping and noise on the cut, accounted by Opacus's accountants."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from cotune.cli.main import main
from cotune.config import build_config
from cotune.config.load import load_config, write_config
from cotune.errors import ConfigError
from cotune.methods import resolve
from cotune.privacy import CutNoise, PrivacyBudget, clip_rows, cut_noise_for, epsilon_spent
from tests.helpers import batch_for, inprocess_pair, tiny_cfg, write_e2e, write_sst2


def test_clipping_bounds_every_row_and_leaves_short_rows_alone() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 16, generator=g) * torch.logspace(-2, 2, 200).unsqueeze(1)
    clipped = clip_rows(rows, 1.5)
    norms, before = clipped.norm(dim=1), rows.norm(dim=1)
    assert float(norms.max()) <= 1.5 + 1e-5
    short = before <= 1.5
    assert short.any() and (~short).any()
    assert torch.equal(clipped[short], rows[short])  # within the bound: untouched
    assert torch.allclose(norms[~short], torch.full_like(norms[~short], 1.5), atol=1e-5)
    # same direction
    cos = torch.nn.functional.cosine_similarity(clipped, rows, dim=1)
    assert float(cos.min()) > 1 - 1e-5


@pytest.mark.parametrize(("epsilon", "accountant"), [(8.0, "rdp"), (1.0, "rdp"), (3.0, "prv")])
def test_planned_noise_spends_the_target_epsilon(epsilon: float, accountant: str) -> None:
    budget = PrivacyBudget.plan(epsilon, 1e-5, clip=1.0, max_rows=64, batch_size=32,
                                n_examples=8000, steps=600, accountant=accountant)  # fmt: skip
    spent = budget.spent(600)
    assert epsilon * 0.97 <= spent <= epsilon * 1.001  # reached, within the search tolerance
    # less noise would overspend: the multiplier is the smallest that fits
    assert epsilon_spent(budget.sigma * 0.95, 1e-5, 32 / 8000, 600, accountant) > epsilon
    assert budget.spent(300) < spent  # spending grows with the steps taken
    assert budget.noise_std == pytest.approx(budget.sigma * 1.0 * math.sqrt(64))


def test_the_noise_drawn_has_the_accountants_std() -> None:
    budget = PrivacyBudget.plan(2.0, 1e-5, clip=0.5, max_rows=16, batch_size=16,
                                n_examples=1000, steps=100)  # fmt: skip
    noise = CutNoise(budget, seed=1)
    out = noise(torch.zeros(4000, 64), train=True)  # zero rows: all that comes out is noise
    assert float(out.std()) == pytest.approx(budget.noise_std, rel=0.02)
    assert abs(float(out.mean())) < 0.02 * budget.noise_std
    assert noise.train_releases == 1
    noise(torch.zeros(3, 64), train=False)
    assert noise.train_releases == 1  # an evaluation forward is not a training release


def test_noise_is_added_on_the_device_before_the_codec() -> None:
    cfg = tiny_cfg("bert", privacy={"epsilon": 4.0, "noise_seed": 3})
    device, _, _ = inprocess_pair(cfg)
    batch = batch_for("bert", b=3, length=7)
    device.eval()
    clean_msg, _ = device._forward_message(batch, train=False)
    device.noise = cut_noise_for(cfg, n_examples=500, steps=50)
    assert device.noise is not None
    noisy_msg, _ = device._forward_message(batch, train=False)
    n = int(batch["attention_mask"].sum())
    decode = device.codec.forward.decode  # identity: exactly the rows sent
    clean = decode(clean_msg.forward.activations, "a", n, device.width)
    noisy = decode(noisy_msg.forward.activations, "a", n, device.width)
    clipped = clip_rows(clean, cfg.privacy.clip)
    assert float(clean.norm(dim=1).min()) > cfg.privacy.clip  # the clipping did something
    resid = noisy - clipped
    assert float(resid.std()) == pytest.approx(device.noise.budget.noise_std, rel=0.15)


def test_pca_and_image_tasks_are_refused() -> None:
    cfg = tiny_cfg("bert", privacy={"epsilon": 4.0}, link={"codec": "pca"})
    with pytest.raises(ConfigError, match="PCA calibration"):
        cut_noise_for(cfg, n_examples=100, steps=10)
    with pytest.raises(ConfigError, match="image tasks"):
        cut_noise_for(tiny_cfg("bert", privacy={"epsilon": 4.0}), n_examples=100, steps=10,
                      image_task=True)  # fmt: skip
    assert cut_noise_for(tiny_cfg("bert"), n_examples=100, steps=10) is None  # off


def _run(args: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    try:
        code = main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _split_args(data, out, *extra: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        "run",
        "--set", "method=split",
        "--set", "task.name=glue/sst2",
        "--set", f"task.data_dir={json.dumps(str(data))}",
        "--set", "model.name=tiny-bert",
        "--set", "split.cut=1",
        "--set", "train.steps=6",
        "--set", "train.batch_size=8",
        "--set", "train.eval_every=3",
        "--set", "train.max_seq_len=24",
        *extra,
        "--out", str(out),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "needle"),
    [("privacy.epsilon=0", "privacy.epsilon"), ("privacy.epsilon=-1", "privacy.epsilon"),
     ("privacy.delta=1", "privacy.delta"), ("privacy.delta=1.5", "privacy.delta"),
     ("privacy.clip=0", "privacy.clip"),
     # non-finite values: a clear error, not an infinite budget or a NaN noise
     ("privacy.epsilon=inf", "privacy.epsilon: Input should be a finite number"),
     ("privacy.epsilon=nan", "privacy.epsilon: Input should be a finite number"),
     ("privacy.delta=nan", "privacy.delta: Input should be a finite number"),
     ("privacy.clip=inf", "privacy.clip: Input should be a finite number"),
     ("privacy.clip=nan", "privacy.clip: Input should be a finite number")],
)  # fmt: skip
def test_bad_privacy_settings_exit_2(setting: str, needle: str, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, err = _run(_split_args(write_sst2(tmp_path), tmp_path / "r", "--set", setting), capsys)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_private_split_run_reports_epsilon_per_evaluation(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = write_sst2(tmp_path)
    out = tmp_path / "r"
    args = _split_args(data, out, "--set", "privacy.epsilon=3.0", "--set", "privacy.noise_seed=0")
    code, err = _run(args, capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 3.0 * 1.001
    assert eps[1] >= 3.0 * 0.97  # all the steps: the whole budget spent
    assert 0 < rows[0]["eval_epsilon"] < rows[1]["eval_epsilon"]
    summary = json.loads((out / "summary.json").read_text())
    p = summary["privacy"]
    assert p["target_epsilon"] == 3.0 and p["steps"] == 6 and p["labels_cross"] is True
    assert p["sample_rate"] == pytest.approx(8 / 160)
    assert p["noise_std"] == pytest.approx(p["noise_multiplier"] * math.sqrt(24))


@pytest.mark.parametrize("method", ["split", "splitfed"])
def test_split_methods_keep_privacy_in_the_written_config(method: str, tmp_path: Path) -> None:
    # [privacy] is read by split and splitfed: no "ignored" warning, and the written
    # config.toml keeps it (cotune attack RUN_DIR reads the run's noise from it)
    raw: dict[str, Any] = {
        "method": method, "model": {"name": "tiny-bert"}, "split": {"cut": 1},
        "privacy": {"epsilon": 2.0, "clip": 0.5},
    }  # fmt: skip
    if method == "splitfed":  # a causal LM on a generation task, LoRA
        raw["task"] = {"name": "e2e", "data_dir": str(write_e2e(tmp_path / "e2e", n_train=4))}
        raw["model"] = {"name": "tiny-llama", "lora": {"r": 4}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = resolve(build_config(raw))
    write_config(cfg, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again.privacy.epsilon == 2.0 and again.privacy.clip == 0.5
    # a method that does not read it still says so
    with pytest.warns(UserWarning, match=r"\[privacy\] is not read by method 'centralized'"):
        resolve(build_config({"method": "centralized", "model": {"name": "tiny-bert"},
                              "privacy": {"epsilon": 2.0}}))  # fmt: skip
