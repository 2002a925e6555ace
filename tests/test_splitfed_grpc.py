"""splitfed over gRPC on loopback: a cloud process and three device processes finish a
short run; killing one device mid-run leaves the others training to the end."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from helpers import eventually, splitfed_config, write_e2e

from cotune.methods import NullRecorder, get_spec, resolve
from cotune.runtime.launcher import Child
from cotune.runtime.split.launch import run_split


def _logged(folder: Path, device: int, step: int) -> bool:
    """Whether the device process has recorded training step `step` (its run folder's
    train.jsonl gets one line per step)."""
    train = folder / f"device-{device}" / "train.jsonl"
    if not train.exists():
        return False
    steps = []
    for line in train.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written right now
            continue
    return max(steps, default=0) >= step


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X")


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
    # Device 2 is killed once it has logged step 2. So that it cannot have run on to the
    # end before `watch` (every 0.5 s) sees that line, device 0 is held (SIGSTOP) from
    # the start until then: round 1's averaging waits for every device (bounded by
    # federated.round_timeout), so device 2 stays in round 1 until it is killed.
    held: list[int] = []
    first_call = [True]

    def watch(devices: dict[int, Child], folder: Path) -> None:
        if first_call:  # the devices were started just now
            first_call.clear()
            devices[0].proc.send_signal(signal.SIGSTOP)
            held.append(0)
            eventually(lambda: _stopped(devices[0].pid), timeout=30)
            if _logged(folder, 0, 2):  # already in round 1: it cannot hold device 2 back
                devices[0].proc.send_signal(signal.SIGCONT)
                held.clear()
        if not killed and _logged(folder, 2, 2):
            devices[2].kill()
            killed.append(2)
        if held and (killed or not devices[2].alive()):
            devices[0].proc.send_signal(signal.SIGCONT)
            held.clear()

    cfg.runtime.transport = "grpc"  # a cloud process and one process per device
    resolve(cfg)
    spec = get_spec("splitfed").runs
    result = run_split(cfg, spec, NullRecorder(), tmp_path / "run", watch=watch, timeout=300)  # type: ignore[arg-type]
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
