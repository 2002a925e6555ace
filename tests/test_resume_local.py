"""Resuming a centralized run: stopped right after a checkpoint and continued with
`cotune run --resume` (or by `--seeds` on the same folder), it ends with the weights,
metrics and evaluation records of an uninterrupted run with the same seed (dropout on,
so torch's random state must come back too; AdamW and the optimiser stepped inside
backward)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_sst2
from safetensors.torch import load_file

from cotune.cli.main import main
from cotune.config import to_toml
from cotune.report.run_folder import read_jsonl
from cotune.runtime.experiment import load_experiment, run_experiment
from cotune.training.resume import LocalResume, checkpoint_dir, checkpoint_step

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """The run died right after a checkpoint (as a process killed there would)."""


def _config(tmp_path: Path, in_backward: bool) -> Path:
    data = write_sst2(tmp_path, n_train=96)
    path = tmp_path / "run.toml"
    path.write_text(
        'name = "resume"\nmethod = "centralized"\nseed = 3\n\n'
        f'[task]\nname = "glue/sst2"\ndata_dir = {json.dumps(str(data))}\nmax_eval_examples = 32\n\n'
        '[model]\nname = "tiny-bert"\n\n'
        "[train]\nsteps = 7\nbatch_size = 8\nmax_seq_len = 24\nthreads = 1\neval_every = 3\n"
        f"lr = 1e-3\n{'max_grad_norm = 0' if in_backward else ''}\n\n"
        f"[memory]\nstep_in_backward = {'true' if in_backward else 'false'}\n\n"
        "[runtime]\ncheckpoint_minutes = 0\nexport = false\n"
    )
    return path


def _kill_after(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    save = LocalResume.maybe_save

    def saving_then_dying(self, step, stats, since_eval):  # type: ignore[no-untyped-def]
        saved = save(self, step, stats, since_eval)
        if step == at:
            raise Killed
        return saved

    monkeypatch.setattr(LocalResume, "maybe_save", saving_then_dying)


def _same_run(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(str(a / "trainable.safetensors")),
        load_file(str(b / "trainable.safetensors")),
    )
    assert list(wa) == list(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["metrics"] == sb["metrics"] and sb["steps"] == 7
    assert sa["final_train_loss"] == pytest.approx(sb["final_train_loss"], rel=1e-6)
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in mb] == [3, 6, 7]
    keys = ("step", "accuracy", "loss", "train_loss")
    assert [{k: r[k] for k in keys} for r in ma] == [{k: r[k] for k in keys} for r in mb]
    assert [r["step"] for r in read_jsonl(b / "train.jsonl")] == [
        r["step"] for r in read_jsonl(a / "train.jsonl")
    ]
    assert not checkpoint_dir(b).exists()  # removed once the run finished


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_stopped_centralized_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    in_backward: bool,
) -> None:  # fmt: skip
    config = _config(tmp_path, in_backward)
    cfg = load_experiment(config, [])
    whole = run_experiment(cfg, tmp_path / "whole")

    part = tmp_path / "part"
    with monkeypatch.context() as m:
        _kill_after(m, 4)
        with pytest.raises(Killed):
            run_experiment(cfg, part)
    assert checkpoint_step(part) == 4
    assert [r["step"] for r in read_jsonl(part / "metrics.jsonl")] == [3]
    # a record written after the checkpoint (the process died later) is dropped on resume
    with (part / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "accuracy": -1.0}) + "\n")
    # the resumed run must not retrain steps 1-4: the checkpoint's weights are its start
    ckpt = torch.load(checkpoint_dir(part) / "local.pt", weights_only=True)
    assert any(
        not torch.equal(ckpt["trainable"][k], v)
        for k, v in load_file(str(whole / "trainable.safetensors")).items()
    )

    assert main(["run", "--resume", str(part)]) == 0
    capsys.readouterr()
    _same_run(whole, part)


@pytest.mark.slow
def test_seeds_continue_a_stopped_centralized_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, in_backward=False)
    group = tmp_path / "group"
    cfg = load_experiment(config, ["seed=0"])
    whole = run_experiment(cfg, tmp_path / "whole")
    with monkeypatch.context() as m:
        _kill_after(m, 2)
        with pytest.raises(Killed):
            run_experiment(cfg, group / "seed-0")
    assert main(["run", str(config), "--seeds", "0", "--out", str(group)]) == 0
    out = capsys.readouterr().out
    assert "seed 0: continuing in" in out and "after step 2" in out
    _same_run(whole, group / "seed-0")


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = _config(tmp_path, in_backward=False)
    cfg = load_experiment(config, [])
    part = tmp_path / "part"
    part.mkdir()
    # a checkpoint whose tensors are not this model's (another model or LoRA setting)
    from cotune.training.resume import LocalCheckpoint, save_local

    save_local(part, LocalCheckpoint(step=2, trainable={"x": torch.zeros(1)}, optimizer={},
                                     schedule={}, rng=torch.get_rng_state()))  # fmt: skip
    (part / "config.toml").write_text(to_toml(cfg))
    assert main(["run", "--resume", str(part)]) == 2
    err = capsys.readouterr().err
    assert "holds other trainable tensors" in err and "Traceback" not in err
