"""`cotune plan`: the byte predictions are the transport's exact counts, configurations
over the budget are excluded, bad input exits 2 with a message, `--write` loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import batch_for, inprocess_pair, tiny_cfg, write_sst2

from cotune.cli.main import main
from cotune.config import load_config
from cotune.link.network import PROFILES
from cotune.planner import PlanRequest, make_plan
from cotune.planner.wire import split_step_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("link", [{"codec": "identity"}, {"codec": "int8"},
                                  {"codec": "sft", "rank": 4, "code_format": "int8"}])  # fmt: skip
def test_step_bytes_equal_the_transport_count(link: dict) -> None:
    cfg = tiny_cfg("bert", link=link)
    device, _, _ = inprocess_pair(cfg)
    batch = batch_for("bert")
    device.train_step(batch)
    device.train_step(batch)
    train = device.transport.meter.by_phase["train"]
    b, length = batch["input_ids"].shape
    real = int(batch["attention_mask"].sum())
    width = device.width
    predicted = [
        split_step_bytes(
            cfg.link,
            batch=b,
            length=length,
            real_tokens=real,
            width=width,
            step=step,
            label_dtype=batch["labels"].dtype,
        )  # fmt: skip
        for step in (0, 1)
    ]
    assert train["up"] == sum(p.up for p in predicted)
    assert train["down"] == sum(p.down for p in predicted)


def _config(tmp_path: Path) -> Path:
    data = write_sst2(tmp_path)
    path = tmp_path / "base.toml"
    path.write_text(
        'method = "centralized"\n[task]\nname = "glue/sst2"\n'
        f'data_dir = "{data}"\n[model]\nname = "tiny-bert"\n'
        "[train]\nbatch_size = 8\nmax_seq_len = 24\nsteps = 4\n"
    )
    return path


def test_budget_excludes(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path))
    plan = make_plan(cfg, PlanRequest(budget_mib=1e6, gflops=10, cloud_gflops=100,
                                      network=PROFILES["lte"]))  # fmt: skip
    peaks = sorted(c.peak_mib for c in plan.ranked)
    cut = (peaks[0] + peaks[-1]) / 2
    tight = make_plan(cfg, PlanRequest(budget_mib=cut, gflops=10, cloud_gflops=100,
                                       network=PROFILES["lte"]))  # fmt: skip
    assert all(c.peak_mib <= cut for c in tight.ranked)
    over = [c for c in tight.excluded if c.excluded and "budget" in c.excluded]
    assert over and all(c.peak_mib > cut for c in over)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["plan", *args])
    return code, capsys.readouterr().err


def test_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = str(_config(tmp_path))
    code, err = _run(capsys, base, "--memory", "1GiB", "--gflops", "10", "--network", "5g")
    assert code == 2 and "unknown network profile '5g'" in err and "lte" in err
    code, err = _run(capsys, base, "--memory", "1GiB", "--gflops", "10",
                     "--up-mbps", "-1", "--down-mbps", "10")  # fmt: skip
    assert code == 2 and "--up-mbps must be a positive bandwidth" in err
    code, err = _run(capsys, base, "--memory", "10MiB", "--gflops", "10", "--network", "wifi")
    assert code == 2 and "no configuration fits" in err
    assert "the smallest is" in err and "MiB" in err


def test_write_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = str(_config(tmp_path))
    out = tmp_path / "chosen.toml"
    code = main(["plan", base, "--memory", "100GiB", "--gflops", "10", "--network", "wifi",
                 "--write", str(out), "--pick", "2"])  # fmt: skip
    assert code == 0
    cfg = load_config(out)
    assert cfg.method in ("split", "fedavg", "fedlora")
    assert "wrote" in capsys.readouterr().out
    torch.set_num_threads(1)
