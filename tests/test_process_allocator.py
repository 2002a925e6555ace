"""memory.allocator = "jemalloc": the cotune command restarts itself on jemalloc, its
counters feed the breakdown, and a missing library is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cotune.config import Config
from cotune.errors import ConfigError
from cotune.memory.allocator import JEMALLOC_CONF, find_jemalloc, running_jemalloc
from cotune.runtime import process_allocator
from cotune.runtime.process_allocator import RESTARTED, ensure_process_allocator, jemalloc_env

ROOT = Path(__file__).resolve().parents[1]
LIB = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _cfg(allocator: str) -> Config:
    return Config.model_validate({"memory": {"allocator": allocator}})


def test_jemalloc_env_preloads_first_once_and_keeps_a_given_conf() -> None:
    env = jemalloc_env(LIB, {"LD_PRELOAD": f"/x/libfoo.so:{LIB}", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{LIB}:/x/libfoo.so"
    assert env["MALLOC_CONF"] == JEMALLOC_CONF and env[RESTARTED] == "1"
    assert env["PATH"] == "/bin"
    kept = jemalloc_env(LIB, {"MALLOC_CONF": "narenas:1"})
    assert kept["MALLOC_CONF"] == "narenas:1" and kept["LD_PRELOAD"] == LIB


def test_glibc_choices_never_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object) -> None:
        raise AssertionError("restarted")

    monkeypatch.setattr(process_allocator.os, "execve", boom)
    for allocator in ("release", "default"):
        ensure_process_allocator(_cfg(allocator))


def test_missing_jemalloc_is_a_config_error_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if running_jemalloc():
        pytest.skip("this test process already runs on jemalloc")
    monkeypatch.setattr(process_allocator, "find_jemalloc", lambda: None)
    monkeypatch.delenv(RESTARTED, raising=False)
    with pytest.raises(ConfigError, match="apt-get install libjemalloc2") as err:
        ensure_process_allocator(_cfg("jemalloc"))
    assert '"release" (the default)' in str(err.value)
    # a restarted process that still is not on jemalloc stops instead of looping
    monkeypatch.setenv(RESTARTED, "1")
    with pytest.raises(ConfigError, match="does not run on jemalloc"):
        ensure_process_allocator(_cfg("jemalloc"))


def test_bad_allocator_value_lists_the_valid_ones(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cotune", "run", "--set", 'memory.allocator="tcmalloc"'],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "jemalloc" in done.stderr and "release" in done.stderr


@pytest.mark.slow
def test_cotune_memory_on_jemalloc_restarts_and_reports_its_counters(tmp_path: Path) -> None:
    if find_jemalloc() is None:
        pytest.skip("libjemalloc2 is not installed (make setup installs it where apt is usable)")
    from helpers import write_sst2

    data = write_sst2(tmp_path, n_train=64, n_dev=16)
    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "je"\nmethod = "centralized"\n\n'
        f'[task]\nname = "glue/sst2"\ndata_dir = {json.dumps(str(data))}\n\n'
        '[model]\nname = "tiny-bert"\n\n'
        "[train]\nbatch_size = 8\nmax_seq_len = 24\nthreads = 1\n\n"
        '[memory]\nallocator = "jemalloc"\n'
    )
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "cotune", "memory", str(config), "--steps", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "allocator: jemalloc" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["allocator"] == "jemalloc"
    b = summary["memory_breakdown"]  # jemalloc's counters: the heap parts are measured
    assert b["parameters"] > 0 and b["data_and_other"] + b["transient"] > 0
    assert abs(b["parts_total"] - b["peak_rss"]) <= 0.10 * b["peak_rss"]
