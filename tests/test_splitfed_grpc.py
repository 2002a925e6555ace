"""splitfed over gRPC on loopback: a cloud process and three device processes finish a
short run; killing one device mid-run leaves the others training to the end."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from helpers import splitfed_config, write_e2e

from cotune.methods.result import NullRecorder
from cotune.methods.splitfed.launch import run_loopback


@pytest.mark.slow
def test_three_device_processes_survive_one_being_killed(tmp_path: Path) -> None:
    cfg = splitfed_config(
        write_e2e(tmp_path / "e2e", n_train=9),
        train={"steps": 6, "batch_size": 1},
        split={"server": "shared"},
        federated={"aggregate_every": 2},
        runtime={"timeout_s": 120, "connect_timeout_s": 120},
        generation={"num_beams": 2, "max_new_tokens": 6, "metrics": ["bleu", "rouge_l"]},
    )
    killed: list[int] = []

    def watch(devices: dict[int, subprocess.Popen[bytes]], folder: Path) -> None:
        log = (folder / "device-2.log").read_text(errors="replace")
        if not killed and "splitfed device 2 step 2 " in log:
            devices[2].send_signal(signal.SIGKILL)
            killed.append(2)

    result = run_loopback(cfg, NullRecorder(), tmp_path / "run", watch=watch, timeout=300)
    assert killed == [2]
    assert result.extra["exit_codes"][0] == 0 and result.extra["exit_codes"][1] == 0
    assert result.extra["exit_codes"][2] != 0
    survivors = result.extra["devices"]
    assert [d["device"] for d in survivors] == [0, 1]
    for d in survivors:
        assert d["steps"] == 6
        assert len(d["rounds"]) == 3 and d["rounds"][-1] == 2  # the last rounds: 2 devices
    assert result.extra["cloud_steps"] >= 12 + 2  # both survivors' steps plus device 2's
    assert set(result.metrics) == {"bleu", "rouge_l"}
    assert result.bytes_up > 0 and result.bytes_down > 0
    assert result.trainable_device > 0 and result.trainable_cloud > 0
