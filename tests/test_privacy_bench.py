"""benchmarks/privacy.py's cell: the rows through the link and the noise `[privacy]`
plans, the inverter trained and scored; the JSON resumes from finished cells."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import write_sst2

from cotune.attack.cut_attack import device_segment
from cotune.attack.inversion import segment_rows
from cotune.config import build_config
from cotune.models import load_tokenizer
from cotune.privacy import PrivacyBudget

SST2_TRAIN = 67349  # the SST-2 train phrases the benchmark plans its noise for
_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "privacy.py"
_spec = importlib.util.spec_from_file_location("privacy_bench", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["privacy_bench"] = bench
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = write_sst2(tmp_path_factory.mktemp("sst2"), n_train=60, n_dev=8)
    texts = [line.split("\t")[0] for line in (data / "train.tsv").read_text().splitlines()[1:]]
    cfg = build_config({
        "method": "split", "task": {"name": "glue/sst2", "data_dir": str(data)},
        "model": {"name": "tiny-bert"}, "split": {"cut": 1},
        "train": {"max_seq_len": 24, "threads": 1},
    })  # fmt: skip
    tokenizer = load_tokenizer("tiny-bert")
    raw = segment_rows(device_segment(cfg, 2, "classification"), tokenizer, texts,
                       max_length=24, skip_ids=list(tokenizer.all_special_ids))  # fmt: skip
    informative = tokenizer.convert_tokens_to_ids(["great", "awful"])
    return raw, {"n_train": SST2_TRAIN, "informative": informative}


def test_identity_rows_seen_by_the_inverter_are_all_recovered(rows: Any, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # public = device: an inverter fitted to the very rows the device sends (a perfect
    # attacker) recovers every token; the floors stay far below
    monkeypatch.setattr(bench, "INVERTER_STEPS", 300)
    raw, s = rows
    r = bench.cell(s, raw, raw, "identity", 1, None)
    assert r["token_recovery"] >= 0.99 and r["vocab_coverage"] == 1.0
    assert r["floor_untrained"] < 0.2 and r["floor_majority"] < 0.3
    assert r["noise_std"] == 0.0 and r["device_rows"] == raw.rows.shape[0]
    int8 = bench.cell(s, raw, raw, "int8", 1, None)
    assert int8["token_recovery"] >= 0.97


def test_epsilon_one_is_the_noise_a_users_run_plans_and_drowns_the_rows(
    rows: Any, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(bench, "INVERTER_STEPS", 300)
    raw, s = rows
    r = bench.cell(s, raw, raw, "identity", 1, 1.0)
    p = bench.PRIVACY
    planned = PrivacyBudget.plan(1.0, p["delta"], p["clip"], bench.MAX_LEN, p["batch_size"],
                                 SST2_TRAIN, p["steps"])  # fmt: skip
    assert r["noise_std"] == pytest.approx(planned.noise_std) and r["noise_std"] > 5
    # the attacker trains on other noise draws than the device's: no better than a guess
    assert r["token_recovery"] < r["floor_majority"] + 0.1


def test_finished_cells_are_kept_and_tabled(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    b = bench.Bench(path)
    cell = {"token_recovery": 0.5, "informative_recovery": 0.25, "floor_untrained": 0.0,
            "floor_majority": 0.04, "public_fit": 0.9, "noise_std": 0.0}  # fmt: skip
    b.put("sweep/cut1/identity/none", cell)
    again = bench.Bench(path)
    assert again.done("sweep/cut1/identity/none") and not again.done("sweep/cut2/identity/none")
    md = bench.table(again.data)
    assert "| 1 | identity | 50.0% / 25.0% | not run | not run |" in md
    assert "Upper bound" in md
