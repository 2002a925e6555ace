"""report.stats: t-intervals across seeds, bootstrap intervals over eval examples, paired
differences, per-example metric statistics; aggregate.json; `compare` on seed groups.
Everything here is numpy/scipy on synthetic data (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cotune.data.e2e_metrics import bleu
from cotune.data.metrics import compute
from cotune.report import RunFolder
from cotune.report.aggregate import aggregate_runs, group_runs, write_aggregate
from cotune.report.compare import compare, load_entries, paired_difference
from cotune.report.stats import (
    bootstrap_interval,
    mean_statistic,
    metric_statistic,
    paired_bootstrap_interval,
    paired_bootstrap_mean_interval,
    seed_summary,
    t_interval,
)

# ----------------------------------------------------------------------------- seeds


def test_t_interval_is_the_textbook_formula() -> None:
    values = [0.81, 0.79, 0.84]
    ci = t_interval(values, 0.95)
    mean, s = float(np.mean(values)), float(np.std(values, ddof=1))
    half = scipy_stats.t.ppf(0.975, 2) * s / math.sqrt(3)
    assert ci.estimate == pytest.approx(mean)
    assert (ci.low, ci.high) == pytest.approx((mean - half, mean + half))
    assert ci.half_width == pytest.approx(half) and ci.n == 3 and ci.method == "t"
    summary = seed_summary(values)
    assert summary["values"] == values and summary["std"] == pytest.approx(s)


def test_t_interval_of_one_seed_has_no_bounds() -> None:
    ci = t_interval([0.8])
    assert ci.estimate == 0.8 and math.isnan(ci.low) and math.isnan(ci.high)
    assert not ci.excludes(0.0)


def test_t_interval_covers_the_true_mean_at_its_rate() -> None:
    rng = np.random.default_rng(1)
    reps, hits = 2000, 0
    for _ in range(reps):
        ci = t_interval(rng.normal(0.8, 0.02, size=3))
        hits += ci.low <= 0.8 <= ci.high
    assert 0.93 <= hits / reps <= 0.97, hits / reps


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_covers_the_true_mean_at_roughly_its_rate() -> None:
    """Normal(2, 1) samples of 50: the 95% percentile interval of the mean covers 2 in
    about 95% of 400 seeded repetitions (percentile intervals under-cover slightly at
    small n; the band allows for that and for the repetitions' own noise, SE ~1.1%)."""
    rng = np.random.default_rng(0)
    reps, hits = 400, 0
    for rep in range(reps):
        x = rng.normal(2.0, 1.0, size=50)
        ci = bootstrap_interval(mean_statistic(x), len(x), resamples=1000, seed=rep)
        assert ci.estimate == pytest.approx(x.mean())
        hits += ci.low <= 2.0 <= ci.high
    assert 0.90 <= hits / reps <= 0.98, hits / reps


def test_bootstrap_is_seeded() -> None:
    x = np.random.default_rng(3).random(100)
    a = bootstrap_interval(mean_statistic(x), 100, seed=7)
    b = bootstrap_interval(mean_statistic(x), 100, seed=7)
    c = bootstrap_interval(mean_statistic(x), 100, seed=8)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)


def test_paired_difference_of_identical_runs_is_exactly_zero() -> None:
    correct = np.random.default_rng(5).random(300) < 0.7
    ci = paired_bootstrap_interval(mean_statistic(correct), mean_statistic(correct.copy()), 300)
    assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0)
    assert not ci.excludes(0.0)


def test_paired_bootstrap_detects_a_clear_difference_and_shares_indices() -> None:
    """b is a with 30 of 400 correct answers turned wrong: the difference is +0.075 on
    every draw's examples only if the two runs are resampled jointly, so the paired
    interval is much narrower than an unpaired one (the two runs' own intervals
    combined)."""
    rng = np.random.default_rng(2)
    a = rng.random(400) < 0.8
    b = a.copy()
    b[np.flatnonzero(a)[:30]] = False
    ci = paired_bootstrap_interval(mean_statistic(a), mean_statistic(b), 400, seed=1)
    assert ci.estimate == pytest.approx(30 / 400)
    assert ci.excludes(0.0) and ci.low > 0.04
    alone_a = bootstrap_interval(mean_statistic(a), 400, seed=1)
    alone_b = bootstrap_interval(mean_statistic(b), 400, seed=2)
    unpaired = math.hypot(alone_a.half_width, alone_b.half_width)
    assert ci.half_width < 0.6 * unpaired, (ci.half_width, unpaired)


# ----------------------------------------------------------------------------- metrics


def _records(labels: np.ndarray, preds: np.ndarray, regression: bool = False) -> list[dict]:
    if regression:
        return [{"split": "eval", "index": i, "label": float(y), "prediction": float(p)}
                for i, (y, p) in enumerate(zip(labels, preds, strict=True))]  # fmt: skip
    return [{"split": "eval", "index": i, "label": int(y), "prediction": int(p),
             "correct": int(y) == int(p)} for i, (y, p) in enumerate(zip(labels, preds, strict=True))]  # fmt: skip


def _full(stat: Any, n: int) -> float:
    return float(stat(np.arange(n)[None, :])[0])


def test_per_example_statistics_reproduce_the_task_metrics_on_all_examples() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
    recs = _records(labels, preds)
    want = compute(("accuracy", "mcc"), preds, labels, "classification", 3)
    assert _full(metric_statistic("accuracy", recs), 200) == want["accuracy"]
    assert _full(metric_statistic("mcc", recs), 200) == pytest.approx(want["mcc"], abs=1e-12)
    y = rng.random(80) * 5
    p = (y + rng.normal(0, 1, 80)).astype(np.float32)
    recs = _records(y, p, regression=True)
    want = compute(("pearson", "spearman"), p, y, "regression", 1)
    for m in ("pearson", "spearman"):
        assert _full(metric_statistic(m, recs), 80) == pytest.approx(want[m], abs=1e-12)


def test_bleu_statistic_is_corpus_bleu_on_all_inputs() -> None:
    hyps = ["the eagle is a pub near the river .", "green man serves cheap food", "blue spice"]
    refs = [
        ["The Eagle is a pub near the river.", "There is a pub called The Eagle by the river."],
        ["The Green Man serves cheap food.", "Green Man is a cheap restaurant."],
        ["Blue Spice is a coffee shop.", "Blue Spice is a coffee shop in the city centre.",
         "A coffee shop: Blue Spice."],
    ]  # fmt: skip
    recs = [{"split": "test", "index": i, "prompt": "p", "output": h} for i, h in enumerate(hyps)]
    stat = metric_statistic("bleu", recs, refs)
    assert _full(stat, 3) == pytest.approx(bleu(hyps, refs), abs=1e-9)
    assert bleu(hyps, refs) > 10  # not a vacuous 0 == 0
    ci = bootstrap_interval(stat, 3, resamples=200)
    assert 0.0 <= ci.low <= ci.high <= 100.0 + 1e-9


def test_unsupported_metric_is_named() -> None:
    with pytest.raises(ValueError, match="supported"):
        metric_statistic("meteor", [])


# ------------------------------------------------------------- aggregate and compare


def _run(
    path: Path, seed: int, acc: float, correct: list[bool] | None = None, lr: float = 0.1
) -> Path:
    run = RunFolder(path)
    run.write_config(f'name = "g"\nmethod = "centralized"\nseed = {seed}\n\n[train]\nlr = {lr}\n')
    run.log_eval({"step": 1, "accuracy": acc, "bytes_up": 0, "bytes_down": 0, "wall_s": 1.0})
    run.write_summary({
        "name": "g", "seed": seed, "method": "centralized", "task": "glue/sst2",
        "model": "tiny-bert", "metrics": {"accuracy": acc, "loss": 0.5},
        "comm": {"bytes_up": 10, "bytes_down": 20}, "wall_s": 2.0, "device_peak_bytes": 100,
        "trainable_params": {"device": 1, "cloud": 0}, "saved_activation_bytes": 1,
    })  # fmt: skip
    if correct is not None:
        run.write_predictions([{"split": "eval", "index": i, "label": 1, "prediction": int(c),
                                "correct": c} for i, c in enumerate(correct)])  # fmt: skip
    return path


def test_aggregate_json_holds_per_seed_values_mean_std_interval(tmp_path: Path) -> None:
    runs = [_run(tmp_path / f"seed-{s}", s, acc, [True] * 7 + [False] * 3)
            for s, acc in ((0, 0.8), (1, 0.7), (2, 0.9))]  # fmt: skip
    write_aggregate(tmp_path, runs)
    agg = json.loads((tmp_path / "aggregate.json").read_text())
    assert agg["n_seeds"] == 3 and agg["seeds"] == [0, 1, 2] and agg["eval_size"] == 10
    assert agg["runs"] == ["seed-0", "seed-1", "seed-2"]
    acc = agg["metrics"]["accuracy"]
    ci = t_interval([0.8, 0.7, 0.9])
    assert acc["values"] == [0.8, 0.7, 0.9] and acc["mean"] == pytest.approx(0.8)
    assert acc["std"] == pytest.approx(0.1) and acc["low"] == pytest.approx(ci.low)
    assert group_runs(tmp_path) == runs
    one = aggregate_runs(runs[:1])
    assert math.isnan(one["metrics"]["accuracy"]["half_width"])


def test_compare_groups_seeds_and_prints_the_paired_difference(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.7
    a_runs, b_runs = [], []
    for s in range(3):
        a = base.copy()
        a[rng.choice(200, 5, replace=False)] ^= True
        b = a.copy()
        b[np.flatnonzero(a)[:40]] = False  # group b is clearly worse on the same examples
        a_runs.append(_run(tmp_path / "A" / f"seed-{s}", s, float(a.mean()), a.tolist()))
        b_runs.append(_run(tmp_path / "B" / f"r{s}", s, float(b.mean()), b.tolist(), lr=0.2))
    write_aggregate(tmp_path / "A", a_runs)
    # group A through its aggregate.json; group B as loose runs of one config
    entries = load_entries([tmp_path / "A", *b_runs])
    assert [e.is_group for e in entries] == [True, True] and len(entries[1].runs) == 3
    paired = paired_difference(entries[0], entries[1], "accuracy")
    assert not isinstance(paired, str)
    assert paired.interval.estimate == pytest.approx(40 / 200) and paired.interval.excludes(0.0)
    out = compare([tmp_path / "A", *b_runs], tmp_path / "cmp.png")
    text = capsys.readouterr().out
    assert "±" in text and " n " in text or "│ n" in text
    assert "paired bootstrap" in text and "excludes 0" in text
    assert out.read_bytes()[:4] == b"\x89PNG"
    # the same group against itself: exactly [0, 0]
    same = paired_difference(entries[0], entries[0], "accuracy")
    assert not isinstance(same, str)
    assert (same.interval.low, same.interval.high) == (0.0, 0.0)


def test_compare_says_why_there_is_no_paired_interval(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", 0, 0.7, [True, False, True])
    b = _run(tmp_path / "b", 0, 0.5, [True, False], lr=0.2)
    entries = load_entries([a, b])
    assert "same examples" in str(paired_difference(entries[0], entries[1], "accuracy"))
    c = _run(tmp_path / "c", 0, 0.5, None, lr=0.3)
    assert "predictions.jsonl" in str(
        paired_difference(entries[0], load_entries([c])[0], "accuracy")
    )


def test_paired_mean_over_seeds_with_their_own_examples() -> None:
    """Seeds with their own eval examples are resampled independently: identical runs
    still give exactly [0, 0], and a difference of 20 of 100 in each seed is found."""
    rng = np.random.default_rng(4)
    a = [rng.random(100) < 0.7 for _ in range(3)]
    same = paired_bootstrap_mean_interval(
        [(mean_statistic(x), mean_statistic(x.copy()), 100) for x in a], shared_examples=False
    )
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    b = [x.copy() for x in a]
    for x in b:
        x[np.flatnonzero(x)[:20]] = False
    pairs = [(mean_statistic(x), mean_statistic(y), 100) for x, y in zip(a, b, strict=True)]
    ci = paired_bootstrap_mean_interval(pairs, shared_examples=False, seed=3)
    assert ci.estimate == pytest.approx(0.2) and ci.excludes(0.0)
    assert ci.method == "paired-bootstrap-per-seed"


def test_compare_pairs_groups_seed_by_seed(tmp_path: Path) -> None:
    """Each seed evaluated on its own examples (labels differ per seed): groups are
    paired by seed; a group cannot be paired with one run; different seeds cannot pair."""
    rng = np.random.default_rng(1)

    def run(path: Path, seed: int, correct: np.ndarray, lr: float) -> Path:
        _run(path, seed, float(correct.mean()), correct.tolist(), lr=lr)
        # a seeded eval subsample: other labels in every seed
        recs = [json.loads(x) for x in (path / "predictions.jsonl").read_text().splitlines()]
        for r in recs:
            r["label"] = (r["index"] * (seed + 2)) % 3
        (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return path

    a_runs, b_runs = [], []
    for s in range(3):
        a = rng.random(60) < 0.7
        a_runs.append(run(tmp_path / "A" / f"seed-{s}", s, a, 0.1))
        b_runs.append(run(tmp_path / "B" / f"seed-{s}", s, a, 0.2))
    write_aggregate(tmp_path / "A", a_runs)
    write_aggregate(tmp_path / "B", b_runs)
    assert (
        json.loads((tmp_path / "A" / "aggregate.json").read_text())["eval_examples_shared"] is False
    )
    ga, gb = load_entries([tmp_path / "A", tmp_path / "B"])
    paired = paired_difference(ga, gb, "accuracy")
    assert not isinstance(paired, str) and not paired.shared_examples and paired.pairs == 3
    assert (paired.interval.low, paired.interval.high) == (0.0, 0.0)
    single = load_entries([b_runs[0]])[0]
    assert "same examples" in str(paired_difference(ga, single, "accuracy"))
    write_aggregate(tmp_path / "B2", b_runs[:2])
    assert "different seeds" in str(
        paired_difference(ga, load_entries([tmp_path / "B2"])[0], "accuracy")
    )


def test_qa_exact_match_and_f1_resample_the_mean_of_question_scores() -> None:
    from cotune.report.stats import metric_statistic

    records = [
        {"answers": ["Denver Broncos"], "prediction": "Denver Broncos", "exact_match": 100.0, "f1": 100.0},
        {"answers": ["Denver Broncos"], "prediction": "Denver", "exact_match": 0.0, "f1": 200 / 3},
        {"answers": ["x"], "prediction": "", "exact_match": 0.0, "f1": 0.0},
    ]  # fmt: skip
    em, f1 = metric_statistic("exact_match", records), metric_statistic("f1", records)
    rows = np.array([[0, 1, 2], [1, 1, 1], [0, 0, 2]])
    assert em(rows).tolist() == pytest.approx([100 / 3, 0.0, 200 / 3])
    assert f1(rows).tolist() == pytest.approx([(100 + 200 / 3) / 3, 200 / 3, 200 / 3])
    with pytest.raises(ValueError, match="extractive-QA predictions"):
        metric_statistic("f1", [{"label": 1, "prediction": 1, "correct": True}])
