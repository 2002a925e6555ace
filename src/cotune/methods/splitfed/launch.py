"""splitfed over gRPC: one process per device, one cloud process.

- `run_grpc_device`: this process is device `runtime.device_id` of the cloud at
  `runtime.cloud` (what `cotune device` runs for a splitfed config). It trains, saves its
  adapter (`device_trainable.safetensors`) and reports its bytes; the merged model is
  evaluated by whoever holds the cloud's adapters too.
- `run_loopback`: `cotune run` with `runtime.transport = "grpc"` and no `runtime.cloud`:
  starts `cotune cloud` and `federated.clients` `cotune device` processes on 127.0.0.1
  (fresh random tokens), waits for the devices, stops the cloud (which saves its
  adapters) and evaluates the merged model. A device that dies does not stop the run:
  the cloud stops waiting for it and the others finish.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file

from cotune.config import Config, to_toml
from cotune.errors import UserError
from cotune.link.auth import write_token_file
from cotune.methods.result import MethodResult, Recorder

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
STEP_LINE = "splitfed device {device} step {step} loss {loss:.4f}"


def run_grpc_device(cfg: Config, recorder: Recorder, run_dir: Path | None) -> MethodResult:
    from cotune.methods.split import device_token, grpc_factory
    from cotune.methods.splitfed.device import run_device

    assert cfg.runtime.cloud is not None
    device_id = cfg.runtime.device_id

    def on_step(device: int, step: int, loss: float) -> None:
        print(STEP_LINE.format(device=device, step=step, loss=loss), flush=True)
        if step % 10 == 0:
            recorder.log_train({"step": step, "loss": loss})

    factory = grpc_factory(cfg, cfg.runtime.cloud, device_token(cfg))
    t0 = time.perf_counter()
    rep = run_device(cfg, device_id, factory, on_step=on_step)
    wall = time.perf_counter() - t0
    last = rep.losses[-10:]
    loss = sum(last) / max(len(last), 1)
    if run_dir is not None:
        save_file(
            {n: t.contiguous() for n, t in rep.state.items()},
            str(Path(run_dir) / "device_trainable.safetensors"),
        )
        record = {
            "device": device_id, "examples": rep.examples, "steps": rep.steps,
            "rounds": rep.rounds, "train_s": rep.train_s, "intervals": rep.intervals,
            "peak_rss_bytes": rep.peak_rss_bytes, "meter": rep.meter,
        }  # fmt: skip
        (Path(run_dir) / "device_report.json").write_text(json.dumps(record) + "\n")
    recorder.log_eval(
        {"step": rep.steps, "loss": loss, "bytes_up": rep.meter["bytes_up"],
         "bytes_down": rep.meter["bytes_down"], "wall_s": wall}
    )  # fmt: skip
    return MethodResult(
        metrics={"loss": loss},
        bytes_up=int(rep.meter["bytes_up"]),
        bytes_down=int(rep.meter["bytes_down"]),
        device_peak_bytes=rep.peak_rss_bytes,
        saved_activation_bytes=rep.saved_activation_bytes,
        trainable_device=rep.trainable,
        trainable_cloud=0,  # the cloud reports its own (cloud/cloud.json)
        extra={"device": device_id, "steps": rep.steps, "rounds": rep.rounds,
               "train_s": rep.train_s, "reconnects": rep.reconnects},
    )  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _stop(proc: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_loopback(
    cfg: Config,
    recorder: Recorder,
    run_dir: Path | None,
    *,
    watch: Callable[[dict[int, subprocess.Popen[bytes]], Path], None] | None = None,
    timeout: float | None = None,
) -> MethodResult:
    """Cloud + one process per device on 127.0.0.1; `watch(devices, folder)` runs every
    half second while the devices train (tests use it to kill one)."""
    from cotune.methods.splitfed import evaluate_merged

    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="cotune-splitfed-") as tmp:
            return run_loopback(cfg, recorder, Path(tmp), watch=watch, timeout=timeout)
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    n = cfg.federated.clients
    tokens_path = folder / "tokens"
    write_token_file(tokens_path, list(range(n)))
    shared = cfg.model_copy(deep=True)
    shared.runtime.tokens = str(tokens_path)
    shared.runtime.transport = "grpc"
    shared.runtime.cloud = None
    shared.runtime.tls_cert = shared.runtime.tls_key = shared.runtime.tls_ca = None
    cfg_path = folder / "splitfed.toml"
    cfg_path.write_text(to_toml(shared))
    port_file = folder / "cloud.port"
    port_file.unlink(missing_ok=True)
    cloud_log = open(folder / "cloud.log", "wb")  # noqa: SIM115 (closed below)
    cloud = subprocess.Popen(
        [sys.executable, "-m", "cotune", "cloud", "--config", str(cfg_path),
         "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--out", str(folder / "cloud")],
        stdout=cloud_log, stderr=subprocess.STDOUT, env=_env(),
    )  # fmt: skip
    devices: dict[int, subprocess.Popen[bytes]] = {}
    logs = []
    t0 = time.perf_counter()
    try:
        wait_s = max(STARTUP_TIMEOUT_S, cfg.runtime.connect_timeout_s)
        deadline = time.monotonic() + wait_s
        while not port_file.exists():
            if cloud.poll() is not None:
                tail = (folder / "cloud.log").read_text(errors="replace")[-2000:]
                raise UserError(
                    f"the splitfed cloud exited with status {cloud.returncode}:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise UserError(f"the splitfed cloud did not start within {wait_s:.0f} s")
            time.sleep(0.1)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        for i in range(n):
            out = open(folder / f"device-{i}.log", "wb")  # noqa: SIM115 (closed below)
            logs.append(out)
            devices[i] = subprocess.Popen(
                [sys.executable, "-m", "cotune", "device", "--config", str(cfg_path),
                 "--cloud", address, "--device-id", str(i), "--out", str(folder / f"device-{i}")],
                stdout=out, stderr=subprocess.STDOUT, env=_env(),
            )  # fmt: skip
        limit = time.monotonic() + (timeout or 10 * cfg.runtime.timeout_s)
        while any(p.poll() is None for p in devices.values()):
            if watch is not None:
                watch(devices, folder)
            if time.monotonic() > limit:
                raise UserError("splitfed devices did not finish in time; see device-*.log")
            time.sleep(0.5)
    finally:
        for p in devices.values():
            _stop(p, grace=10.0)
        _stop(cloud)
        cloud_log.close()
        for f in logs:
            f.close()
    train_wall = time.perf_counter() - t0
    codes = {i: p.returncode for i, p in devices.items()}
    done = [i for i, c in codes.items() if c == 0]
    if not done:
        tail = (folder / "device-0.log").read_text(errors="replace")[-2000:]
        raise UserError(f"no splitfed device finished (exit codes {codes}); device 0:\n{tail}")
    reports = [
        json.loads((folder / f"device-{i}" / "device_report.json").read_text()) for i in done
    ]
    summaries = [json.loads((folder / f"device-{i}" / "summary.json").read_text()) for i in done]
    cloud_info = json.loads((folder / "cloud" / "cloud.json").read_text())
    device_state = load_file(str(folder / f"device-{done[0]}" / "device_trainable.safetensors"))
    cloud_state = load_file(str(folder / "cloud" / "cloud_trainable.safetensors"))
    metrics = evaluate_merged(cfg, device_state, cloud_state, folder)
    up = sum(int(s["comm"]["bytes_up"]) for s in summaries)
    down = sum(int(s["comm"]["bytes_down"]) for s in summaries)
    recorder.log_eval(
        {"step": max(r["steps"] for r in reports), **metrics, "bytes_up": up,
         "bytes_down": down, "wall_s": time.perf_counter() - t0}
    )  # fmt: skip
    return MethodResult(
        metrics=metrics,
        bytes_up=up,
        bytes_down=down,
        device_peak_bytes=max(int(s.get("device_peak_bytes") or 0) for s in summaries),
        saved_activation_bytes=max(int(s.get("saved_activation_bytes") or 0) for s in summaries),
        trainable_device=int(summaries[0]["trainable_params"]["device"]),
        trainable_cloud=int(cloud_info["trainable_params"]),
        extra={
            "server": cfg.split.server,
            "exit_codes": codes,
            "finished_devices": done,
            "train_wall_s": train_wall,
            "cloud_steps": cloud_info["steps"],
            "devices": [
                {
                    "device": r["device"],
                    "steps": r["steps"],
                    "rounds": r["rounds"],
                    "train_s": r["train_s"],
                    "peak_rss_bytes": r["peak_rss_bytes"],
                    "bytes_up": r["meter"]["bytes_up"],
                    "bytes_down": r["meter"]["bytes_down"],
                }
                for r in reports
            ],  # fmt: skip
        },
    )
