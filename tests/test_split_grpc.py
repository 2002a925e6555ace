"""The split method end to end: the same seed gives the same metrics and bytes in-process
and over gRPC, with `cotune run` starting a loopback cloud and with `cotune cloud` and
`cotune device` as separate processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cotune.cli.main import main
from cotune.config import Config, build_config, to_toml
from cotune.errors import ConfigError
from cotune.link.auth import write_token_file
from cotune.methods import MethodResult, Recorder, get_spec, resolve
from cotune.runtime.split.launch import device_token, run_split

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG: dict[str, Any] = {
    "name": "split-grpc-test",
    "method": "split",
    "seed": 3,
    "task": {"name": "bbc-news", "max_train_examples": 48, "max_eval_examples": 24},
    "model": {"name": "tiny-bert"},
    "train": {"steps": 4, "batch_size": 8, "max_seq_len": 32, "eval_every": 2, "threads": 1},
    "split": {"cut": 2, "labels": "cloud"},
    "link": {"codec": "int8"},
    "runtime": {"connect_timeout_s": 900},  # cloud processes start slowly on a busy machine
}


class Records:
    def __init__(self) -> None:
        self.evals: list[dict[str, Any]] = []

    def log_eval(self, record: dict[str, Any]) -> None:
        self.evals.append(
            {k: v for k, v in record.items() if k not in ("wall_s", "projected_wall_s")}
        )

    def log_train(self, record: dict[str, Any]) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cli_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`cotune cloud` as a separate process, started first so that its start-up overlaps
    the other tests (the device waits for it to come up)."""
    tmp = tmp_path_factory.mktemp("cli")
    tokens = tmp / "tokens"
    write_token_file(tokens, [0, 7])
    cfg_path = tmp / "split.toml"
    cfg_path.write_text(
        to_toml(build_config({**CONFIG, "runtime": {**CONFIG["runtime"], "tokens": str(tokens)}}))
    )
    address = f"127.0.0.1:{_free_port()}"
    cloud = subprocess.Popen(
        [sys.executable, "-m", "cotune", "cloud", "--config", str(cfg_path), "--listen",
         address, "--out", str(tmp / "cloud")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    info: dict[str, Any] = {"tmp": tmp, "config": cfg_path, "address": address, "proc": cloud}
    yield info
    if cloud.poll() is None:
        cloud.terminate()
    cloud.communicate(timeout=60)


def run(cfg: Config, recorder: Recorder) -> MethodResult:
    """The split method as `cotune run` runs it, without a run folder."""
    return run_split(resolve(cfg), get_spec("split").runs, recorder, None)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def inprocess(cli_cloud: dict[str, Any]) -> tuple[Records, Any]:
    rec = Records()
    result = run(build_config(CONFIG), rec)
    return rec, result


@pytest.mark.slow
def test_grpc_loopback_matches_inprocess(inprocess: tuple[Records, Any]) -> None:
    rec, result = inprocess
    cfg = build_config({**CONFIG, "runtime": {**CONFIG["runtime"], "transport": "grpc"}})
    rec_grpc = Records()
    result_grpc = run(cfg, rec_grpc)
    assert len(rec.evals) == 2
    assert rec_grpc.evals == rec.evals  # metrics, losses and cumulative bytes, per evaluation
    assert result_grpc.metrics == result.metrics
    assert (result_grpc.bytes_up, result_grpc.bytes_down) == (result.bytes_up, result.bytes_down)
    assert result.bytes_up > 0 and result.bytes_down > 0


@pytest.mark.slow
def test_cloud_and_device_commands(
    cli_cloud: dict[str, Any], inprocess: tuple[Records, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`cotune device` against the `cotune cloud` process gives the in-process run's
    metrics and bytes; stopping the cloud saves its state and byte counts."""
    _, result = inprocess
    tmp, cloud = cli_cloud["tmp"], cli_cloud["proc"]
    code = main(
        ["device", "--config", str(cli_cloud["config"]), "--cloud", cli_cloud["address"],
         "--device-id", "0", "--out", str(tmp / "device")]
    )  # fmt: skip
    assert code == 0
    assert "device 0: accuracy=" in capsys.readouterr().out
    summary = json.loads((tmp / "device" / "summary.json").read_text())
    assert summary["metrics"] == result.metrics
    assert summary["comm"] == {"bytes_up": result.bytes_up, "bytes_down": result.bytes_down}
    cloud.send_signal(signal.SIGTERM)
    out, _ = cloud.communicate(timeout=60)
    assert cloud.returncode == 0, out.decode()
    assert b"listening on " + cli_cloud["address"].encode() in out
    cloud_summary = json.loads((tmp / "cloud" / "cloud.json").read_text())
    assert cloud_summary["steps"] == 4
    assert (tmp / "cloud" / "cloud_trainable.safetensors").is_file()


def test_device_without_its_token_is_a_config_error(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    write_token_file(tokens, [0])
    cfg = build_config(
        {**CONFIG, "runtime": {**CONFIG["runtime"], "tokens": str(tokens), "device_id": 3}}
    )
    with pytest.raises(ConfigError, match="no token for device 3"):
        device_token(cfg)
    with pytest.raises(ConfigError, match="runtime.tokens"):
        device_token(build_config(CONFIG))
