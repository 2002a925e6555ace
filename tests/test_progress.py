"""Progress: one line per evaluation on stderr as it happens, piped or not; --quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cotune.cli.main import QUIET_ENV
from cotune.report.progress import format_line
from cotune.training.loop import PROGRESS_ENV


def test_line_format_with_eta() -> None:
    line = format_line(
        {"step": 250, "accuracy": 0.91234, "loss": 0.312, "bytes_up": 12_300_000,
         "bytes_down": 4_500, "wall_s": 80.0, "round_bytes_up": 7},
        total=1000,
    )  # fmt: skip
    assert (
        line
        == "[eval] step 250/1000  accuracy=0.9123 loss=0.3120  up 12.3 MB  down 4.5 kB  1m20s, ETA 4m00s"
    )
    assert format_line({"round": 3, "bytes_up": 0, "bytes_down": 0, "wall_s": 5}, None) == (
        "[eval] round 3  up 0 B  down 0 B  5s"
    )
    assert QUIET_ENV == PROGRESS_ENV


def _tsv(folder: Path) -> Path:
    folder.mkdir()
    rows = ["sentence\tlabel"] + [f"{w} film number {i}\t{int(w == 'good')}" for i in range(40)
                                  for w in ("good", "bad")]  # fmt: skip
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows[:17]) + "\n")
    return folder


def _command(data: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "cotune", *flags, "run", "--set", "task.name=sst2",
            "--set", f"task.data_dir={data}", "--set", "model.name=tiny-bert",
            "--set", "train.steps=40", "--set", "train.eval_every=10", "--set", "train.batch_size=4",
            "--out", str(out)]  # fmt: skip


def test_eval_lines_arrive_while_the_run_goes_on_through_a_pipe(tmp_path: Path) -> None:
    data = _tsv(tmp_path / "SST-2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_command(data, tmp_path / "run"), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    assert proc.stderr is not None
    evals, alive_at_first = [], None
    for line in proc.stderr:
        if line.startswith("[eval]"):
            if alive_at_first is None:
                alive_at_first = proc.poll() is None
            evals.append(line.strip())
    assert proc.wait(timeout=300) == 0
    assert alive_at_first is True  # the first line came before the run ended
    assert [e.split()[2] for e in evals] == ["10/40", "20/40", "30/40", "40/40"]
    assert all("accuracy=" in e for e in evals)


def test_quiet_prints_no_progress(tmp_path: Path) -> None:
    data = _tsv(tmp_path / "SST-2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_command(data, tmp_path / "run", "--quiet"), capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[eval]" not in proc.stderr and "step/s" not in proc.stderr and "it/s" not in proc.stderr


def test_quiet_holds_for_one_command_only(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """`main(["--quiet", ...])` called in-process (tests, notebooks) must not silence the
    commands that follow it."""
    from cotune.cli.main import main

    monkeypatch.delenv(QUIET_ENV, raising=False)
    assert main(["--quiet", "config", "--defaults"]) == 0
    assert QUIET_ENV not in os.environ
    monkeypatch.setenv(QUIET_ENV, "1")
    assert main(["--quiet", "config", "--defaults"]) == 0
    assert os.environ[QUIET_ENV] == "1"
    capsys.readouterr()
