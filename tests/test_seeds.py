"""Repeated runs: predictions.jsonl from every kind of method (its correct-rate is the
reported accuracy, exactly), `cotune run --seeds` and `cotune sweep` (one folder per
seed, aggregate.json, resuming without re-running finished runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import splitfed_config, tiny_config, write_e2e, write_sst2

from cotune.cli.main import main
from cotune.config import build_config, to_toml
from cotune.errors import ConfigError
from cotune.methods import resolve
from cotune.report.compare import load_entries, paired_difference
from cotune.report.run_folder import read_jsonl
from cotune.report.stats import metric_statistic
from cotune.runtime.experiment import load_experiment, run_experiment
from cotune.runtime.federated.engine import run_federated
from cotune.runtime.seeds import parse_seeds
from cotune.runtime.sweep import combo_label, parse_grid, plan, split_values

# ----------------------------------------------------------------------------- helpers


def _config_file(tmp_path: Path, **train: Any) -> Path:
    data = write_sst2(tmp_path, n_train=64, n_dev=40)
    steps = train.pop("steps", 4)
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in train.items())
    path = tmp_path / "seeds.toml"
    path.write_text(
        'name = "seeds-test"\nmethod = "centralized"\n\n'
        f'[task]\nname = "glue/sst2"\ndata_dir = {json.dumps(str(data))}\n\n'
        '[model]\nname = "tiny-bert"\n\n'
        f"[train]\nsteps = {steps}\nbatch_size = 8\nmax_seq_len = 24\nthreads = 1\n{extra}"
    )
    return path


def _correct_rate(run_dir: Path, split: str | None = None) -> tuple[int, float]:
    recs = [r for r in read_jsonl(run_dir / "predictions.jsonl") if split in (None, r["split"])]
    return len(recs), sum(r["correct"] for r in recs) / len(recs)


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


# ----------------------------------------------------------------------------- predictions


def test_centralized_predictions_match_the_reported_accuracy(tmp_path: Path) -> None:
    cfg = load_experiment(_config_file(tmp_path))
    out = run_experiment(cfg, tmp_path / "run")
    n, rate = _correct_rate(out)
    assert n == 40  # every dev example, once
    assert rate == _summary(out)["metrics"]["accuracy"]
    recs = read_jsonl(out / "predictions.jsonl")
    assert [r["index"] for r in recs] == list(range(40))
    assert set(recs[0]) == {"split", "index", "label", "prediction", "correct"}
    # the final evaluation is the one logged last, with the same numbers
    assert read_jsonl(out / "metrics.jsonl")[-1]["accuracy"] == rate


def test_split_predictions_come_from_the_device_side_evaluation(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=64, n_dev=36)
    cfg = resolve(build_config({
        "name": "split-preds", "method": "split", "seed": 1,
        "task": {"name": "glue/sst2", "data_dir": str(data)},
        "model": {"name": "tiny-bert"},
        "train": {"steps": 3, "batch_size": 8, "max_seq_len": 24, "threads": 1},
        "split": {"cut": 2}, "link": {"codec": "int8"},
    }))  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run")
    n, rate = _correct_rate(out)
    assert n == 36 and rate == _summary(out)["metrics"]["accuracy"]


def test_federated_server_writes_predictions_of_its_last_evaluation(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=80, n_dev=30)
    cfg = tiny_config(data, federated={"clients": 2, "rounds": 2, "local_steps": 1})
    result = run_federated(cfg, tmp_path / "run", engine="inline")
    n, rate = _correct_rate(tmp_path / "run")
    assert n == 30 and rate == result.metrics["accuracy"]
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["accuracy"] == rate


def test_federated_eval_every_scores_every_kth_round_and_the_last(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=80, n_dev=30)
    cfg = tiny_config(data, federated={"clients": 2, "rounds": 5, "local_steps": 1, "eval_every": 2},
                      runtime={"engine": "inline"})  # fmt: skip
    result = run_experiment(cfg, tmp_path / "run")
    rows = read_jsonl(result / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert ["accuracy" in r for r in rows] == [False, True, False, True, True]
    assert all(r["bytes_up"] > 0 for r in rows)
    assert _summary(result)["metrics"]["accuracy"] == rows[-1]["accuracy"]
    assert _summary(result)["engine"] == "inline"


def test_splitfed_generation_predictions_and_their_bleu(tmp_path: Path) -> None:
    data_dir = write_e2e(tmp_path / "e2e", n_train=6)
    cfg = resolve(splitfed_config(
        data_dir, train={"steps": 2, "batch_size": 1},
        generation={"metrics": ["bleu"], "num_beams": 2, "max_new_tokens": 6},
    ))  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run")
    recs = read_jsonl(out / "predictions.jsonl")
    assert len(recs) == 2  # the two test MRs
    assert all(set(r) == {"split", "index", "prompt", "output"} for r in recs)
    refs = [g["refs"] for g in read_jsonl(out / "generations.jsonl")]
    stat = metric_statistic("bleu", recs, refs)
    bleu = _summary(out)["metrics"]["bleu"]
    assert float(stat(np.arange(2)[None, :])[0]) == pytest.approx(bleu, abs=1e-9)


# ----------------------------------------------------------------------------- parsing


def test_parse_seeds() -> None:
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5, 9") == [3, 4, 5, 9]
    for bad in ("", "a", "1,1", "-1"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_grid_values_are_toml_split_on_top_level_commas() -> None:
    assert split_values("1e-3,2e-3") == ["1e-3", "2e-3"]
    assert split_values('["linear"],["linear","softmax"]') == ['["linear"]', '["linear","softmax"]']
    assert split_values('"a,b",c') == ['"a,b"', "c"]
    axes = parse_grid(["train.lr=1e-3,2e-3", "link.codec=int8,fp16"])
    assert [(a.key, a.values) for a in axes] == [
        ("train.lr", ("1e-3", "2e-3")), ("link.codec", ("int8", "fp16"))
    ]  # fmt: skip
    for bad in (["train.lr"], ["train.lr=1,"], ["seed=1,2"], ["a=1", "a=2"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_seeds_refuse_to_resume_a_folder_of_another_config(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = _config_file(tmp_path)
    other = tmp_path / "group" / "seed-0"
    other.mkdir(parents=True)
    (other / "config.toml").write_text(to_toml(load_experiment(config, ["seed=0", "train.lr=0.5"])))
    (other / "summary.json").write_text("{}")
    code = main(["run", str(config), "--seeds", "0,1", "--out", str(tmp_path / "group")])
    err = capsys.readouterr().err
    assert code == 2 and "different config" in err and "keys: train.lr)" in err
    assert not (tmp_path / "group" / "seed-1").exists()


# ----------------------------------------------------------------------------- --seeds


def test_seeds_resume_without_rerunning_finished_seeds(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = _config_file(tmp_path)
    group = tmp_path / "group"
    assert main(["run", str(config), "--seeds", "0", "--out", str(group)]) == 0
    capsys.readouterr()
    first = group / "seed-0" / "summary.json"
    stamp, text = first.stat().st_mtime_ns, first.read_text()
    # a half-finished group: seed 0 done; ask for 0, 1, 2
    assert main(["run", str(config), "--seeds", "0-2", "--out", str(group)]) == 0
    out = capsys.readouterr().out
    assert "seed 0: already finished" in out and "not re-run" in out
    assert first.stat().st_mtime_ns == stamp and first.read_text() == text
    for s in (0, 1, 2):
        summary = _summary(group / f"seed-{s}")
        assert summary["seed"] == s
        assert (group / f"seed-{s}" / "config.toml").read_text().count(f"seed = {s}\n") == 1
    agg = json.loads((group / "aggregate.json").read_text())
    assert agg["n_seeds"] == 3 and agg["seeds"] == [0, 1, 2] and agg["eval_size"] == 40
    acc = agg["metrics"]["accuracy"]
    assert acc["values"] == [_summary(group / f"seed-{s}")["metrics"]["accuracy"] for s in range(3)]
    assert {"mean", "std", "low", "high", "half_width"} <= set(acc)
    assert "±" in out or "one seed" in out
    # a seed run inside the group is the run `cotune run --set seed=1` makes on its own
    alone = tmp_path / "alone"
    assert main(["run", str(config), "--set", "seed=1", "--out", str(alone)]) == 0
    assert _summary(alone)["metrics"] == _summary(group / "seed-1")["metrics"]
    # compare: the group against seed 1 alone, on the same examples
    entries = load_entries([group, alone])
    assert entries[0].is_group and not entries[1].is_group
    assert not isinstance(paired_difference(entries[0], entries[1], "accuracy"), str)


# ----------------------------------------------------------------------------- sweep


def test_sweep_plan_is_seed_major_and_labels_drop_quotes(tmp_path: Path) -> None:
    config = _config_file(tmp_path)
    axes = parse_grid(["train.lr=1e-3,3e-3", 'name="a","b"'])
    jobs = plan(config, [], axes, [0, 1], tmp_path / "out", threads_one=True)
    assert [(j.label, j.seed) for j in jobs] == [
        ("train.lr=1e-3__name=a", 0), ("train.lr=1e-3__name=b", 0),
        ("train.lr=3e-3__name=a", 0), ("train.lr=3e-3__name=b", 0),
        ("train.lr=1e-3__name=a", 1), ("train.lr=1e-3__name=b", 1),
        ("train.lr=3e-3__name=a", 1), ("train.lr=3e-3__name=b", 1),
    ]  # fmt: skip
    assert jobs[5].cfg.name == "b" and jobs[5].cfg.seed == 1 and jobs[5].cfg.train.lr == 1e-3
    assert jobs[5].run_dir == tmp_path / "out" / "train.lr=1e-3__name=b" / "seed-1"
    assert (
        combo_label((("method", "'split'"), ("link.codec", "sft")))
        == "method=split__link.codec=sft"
    )
    assert combo_label((("x", '"a b/c"'),)) == "x=a_b_c"


@pytest.mark.slow
def test_sweep_resumes_and_aggregates_each_combination(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = _config_file(tmp_path, steps=2)
    out = tmp_path / "sweep"
    # half-finished: one of the two runs is already there (as the sweep would run it)
    done = out / "train.lr=1e-3" / "seed-0"
    sets = ["train.lr=1e-3", "seed=0", "train.threads=1"]
    run_experiment(load_experiment(config, sets), done)
    stamp, text = (done / "summary.json").stat().st_mtime_ns, (done / "summary.json").read_text()
    args = ["sweep", str(config), "--grid", "train.lr=1e-3,3e-3", "--seeds", "0",
            "--parallel", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    text_out = capsys.readouterr().out
    assert "[skip] train.lr=1e-3 seed 0" in text_out and "1 to run" in text_out
    assert "[1/1] train.lr=3e-3 seed 0: accuracy=" in text_out
    assert (done / "summary.json").stat().st_mtime_ns == stamp
    assert (done / "summary.json").read_text() == text
    other = out / "train.lr=3e-3" / "seed-0"
    assert _summary(other)["seed"] == 0 and "lr = 0.003" in (other / "config.toml").read_text()
    assert "threads = 1" in (other / "config.toml").read_text()
    for label in ("train.lr=1e-3", "train.lr=3e-3"):
        agg = json.loads((out / label / "aggregate.json").read_text())
        assert agg["n_seeds"] == 1 and agg["eval_size"] == 40
    sweep = json.loads((out / "sweep.json").read_text())
    assert [c["finished"] for c in sweep["combinations"]] == [1, 1] and not sweep["failed"]
    assert "cotune compare" in text_out  # the combinations compared at the end
    # everything finished: nothing runs again
    stamp = (other / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out
    assert (other / "summary.json").stat().st_mtime_ns == stamp


def test_a_run_written_before_a_key_existed_counts_that_key_as_its_default(tmp_path: Path) -> None:
    from cotune.runtime.seeds import config_differences

    config = _config_file(tmp_path)
    cfg = load_experiment(config, ["seed=0"])
    run = tmp_path / "old-run"
    run.mkdir()
    # as an older cotune wrote it: no `allocator` or `report` in [memory]
    text = to_toml(cfg)
    old = "\n".join(
        line for line in text.splitlines() if not line.startswith(("allocator", "report"))
    )
    assert old != text
    (run / "config.toml").write_text(old)
    assert config_differences(run, cfg) == []
    changed = load_experiment(config, ["seed=0", "train.lr=0.5"])
    assert config_differences(run, changed) == ["train.lr"]
    (run / "config.toml").write_text(text + "\n[no_such_section]\nx = 1\n")  # not loadable now
    assert "no_such_section.x" in config_differences(run, cfg)


@pytest.mark.slow
def test_seeds_and_sweep_continue_an_interrupted_federated_run_from_its_checkpoint(
    tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    data = write_sst2(tmp_path, n_train=120)
    cfg = tiny_config(data, federated={"clients": 3, "rounds": 4, "fraction": 0.67},
                      runtime={"engine": "inline"})  # fmt: skip
    config = tmp_path / "fed.toml"
    config.write_text(to_toml(cfg))
    whole = tmp_path / "whole"
    run_federated(cfg, whole, engine="inline")

    # --seeds: seed 0 stopped after round 2 of 4 continues; rounds 1-2 are not run again
    group = tmp_path / "group"
    run_federated(cfg, group / "seed-0", engine="inline", stop_after=2)
    first_two = read_jsonl(group / "seed-0" / "metrics.jsonl")
    assert [r["round"] for r in first_two] == [1, 2]
    assert main(["run", str(config), "--seeds", "0", "--out", str(group)]) == 0
    out = capsys.readouterr().out
    assert "seed 0: continuing in" in out and "after round 2" in out
    resumed = read_jsonl(group / "seed-0" / "metrics.jsonl")
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[:2] == first_two  # kept, not rewritten by a fresh start
    assert [r["accuracy"] for r in resumed] == [
        r["accuracy"] for r in read_jsonl(whole / "metrics.jsonl")
    ]
    assert _summary(group / "seed-0")["rounds_completed"] == 4

    # sweep: the same, through `cotune run --resume` children
    sweep = tmp_path / "sweep"
    label = "train.lr=0.0005"
    stopped = sweep / label / "seed-0"
    run_federated(
        load_experiment(config, ["train.lr=0.0005", "seed=0", "train.threads=1"]),
        stopped, engine="inline", stop_after=1,
    )  # fmt: skip
    args = ["sweep", str(config), "--grid", "train.lr=0.0005", "--seeds", "0", "--out", str(sweep)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"[resume] {label} seed 0: continues after round 1" in out
    assert [r["round"] for r in read_jsonl(stopped / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _summary(stopped)["rounds_completed"] == 4


def test_a_checkpoint_of_another_config_is_not_continued(tmp_path: Path) -> None:
    from cotune.runtime.seeds import continuable

    data = write_sst2(tmp_path, n_train=60)
    cfg = tiny_config(data, federated={"clients": 2, "rounds": 3}, runtime={"engine": "inline"})
    run_dir = tmp_path / "run"
    run_federated(cfg, run_dir, engine="inline", stop_after=1)
    assert continuable(run_dir, cfg) == "round 1"
    other = tiny_config(data, federated={"clients": 2, "rounds": 3}, runtime={"engine": "inline"},
                        train={"lr": 0.5})  # fmt: skip
    assert continuable(run_dir, other) is None
    # a method that cannot resume never continues, whatever the folder holds
    assert continuable(run_dir, cfg.model_copy(update={"method": "split"})) is None


def test_settings_that_do_not_change_a_run_are_not_differences(tmp_path: Path) -> None:
    from cotune.runtime.seeds import config_differences

    config = _config_file(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(to_toml(load_experiment(config, [])))
    same = load_experiment(
        config, ["train.threads=2", "runtime.checkpoint=false", "runtime.checkpoint_minutes=1",
                 "runtime.export=false"],
    )  # fmt: skip
    assert config_differences(run_dir, same) == []
    assert config_differences(run_dir, load_experiment(config, ["train.lr=0.5"])) == ["train.lr"]
