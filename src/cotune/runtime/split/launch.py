"""Running a split method (`SplitSpec`): one cloud, one or more devices, three ways.

`runtime.transport`:
- `inprocess`: the cloud runs in this process behind the same endpoint, serialization,
  token check and byte accounting as over gRPC; each device is a thread (one device:
  this thread) with its own in-process transport;
- `grpc` with `runtime.cloud` unset: a `cotune cloud` process on 127.0.0.1 (fresh random
  tokens); one device trains in this process, several each in a `cotune device`
  process (so each reports its own memory). A device process that dies does not stop
  the run: the cloud stops waiting for it and the others finish;
- `grpc` with `runtime.cloud = "host:port"`: this process is device `runtime.device_id`
  of a cloud already running there (what `cotune device` does).

Then the method's `finish` turns the cloud's and the devices' outcomes into the result.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from cotune.config import Config, to_toml
from cotune.errors import ConfigError, UserError
from cotune.link.auth import TokenBook, read_device_token, write_token_file
from cotune.link.emulation import EmulatedLink
from cotune.link.grpc_transport import GrpcTransport, TlsFiles, is_loopback
from cotune.link.service import CloudEndpoint
from cotune.link.transport import InProcessTransport, Transport
from cotune.methods import (
    CloudOutcome,
    CloudService,
    DeviceOutcome,
    MethodResult,
    Recorder,
    SplitSpec,
)
from cotune.runtime.launcher import LOOPBACK, Child, cotune_command, stop_all
from cotune.runtime.split.serve import CLOUD_INFO_FILE, CLOUD_STATE_FILE

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
SUMMARY_FILE = "summary.json"

Connect = Callable[[], Transport]
Watch = Callable[[dict[int, Child], Path], None]


def max_message_bytes(cfg: Config) -> int:
    return int(cfg.runtime.max_message_mb * 1024 * 1024)


def device_token(cfg: Config) -> str:
    """This device's token from `runtime.tokens` (a device of a remote cloud)."""
    if cfg.runtime.tokens is None:
        raise ConfigError(
            "runtime.tokens: a device needs the token file its cloud was given "
            "(one '<device id> <token>' line per device; only its own line is needed)"
        )
    return read_device_token(cfg.runtime.tokens, cfg.runtime.device_id)


def grpc_connector(cfg: Config, address: str, token: str, device_id: int | None = None) -> Connect:
    """Connects device `device_id` (default `runtime.device_id`) to the cloud at `address`."""
    rt = cfg.runtime
    tls = None  # plain on loopback, or when the user opted out
    if rt.tls_ca or not (rt.insecure or is_loopback(address)):  # else the system's roots
        tls = TlsFiles(ca=rt.tls_ca, server_name=rt.tls_server_name)
    device = rt.device_id if device_id is None else device_id
    network = device_link(cfg, device)

    def connect() -> Transport:
        return GrpcTransport(address, device, token, tls=tls, max_message_bytes=max_message_bytes(cfg),
                             connect_timeout=rt.connect_timeout_s, network=network)  # fmt: skip

    return connect


def device_link(cfg: Config, device_id: int) -> EmulatedLink | None:
    """Device `device_id`'s emulated network (`[link.network]`; None: none), shared by
    its reconnections so its clock runs on; each device draws jitter and loss from a
    seed of its own."""
    return EmulatedLink.from_config(cfg.link.network, seed=cfg.seed * 100_003 + device_id)


def inprocess_connector(
    cfg: Config, endpoint: CloudEndpoint, device_id: int, token: str
) -> Connect:
    network = device_link(cfg, device_id)

    def connect() -> Transport:
        return InProcessTransport(
            endpoint, device_id, token, max_message_bytes=max_message_bytes(cfg), network=network
        )

    return connect


def device_ids(cfg: Config, spec: SplitSpec) -> list[int]:
    n = spec.devices(cfg)
    return list(range(n)) if n > 1 else [cfg.runtime.device_id]


class _SharedRecorder:
    """A recorder several device threads write to."""

    def __init__(self, inner: Recorder) -> None:
        self.inner = inner
        self.lock = threading.Lock()

    def log_eval(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.inner.log_eval(record)

    def log_train(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.inner.log_train(record)


def outcome_of(device_id: int, result: MethodResult, spec: SplitSpec) -> DeviceOutcome:
    return DeviceOutcome(device_id, result, result.saved.get(spec.device_file, {}))


def run_split(
    cfg: Config,
    spec: SplitSpec,
    recorder: Recorder,
    run_dir: Path | None,
    *,
    watch: Watch | None = None,
    timeout: float | None = None,
) -> MethodResult:
    """Run `spec` as `runtime.transport` and `runtime.cloud` say (see the module doc).

    `watch(devices, folder)` runs every half second while device processes train, and
    `timeout` bounds them (default 10 x `runtime.timeout_s`); tests use both."""
    t0 = time.perf_counter()
    if cfg.runtime.transport == "inprocess":
        service, outcomes = run_in_process(cfg, spec, recorder, run_dir)
        cloud = CloudOutcome(service.trainable_state(), service.steps, service.trainable_count())
        info: dict[str, Any] = {}
    elif cfg.runtime.cloud is not None:
        connect = grpc_connector(cfg, cfg.runtime.cloud, device_token(cfg))
        result = spec.device(cfg, cfg.runtime.device_id, connect, recorder, run_dir)
        if spec.devices(cfg) > 1:  # one of several devices: its own figures
            _log_final(recorder, result, t0)
        return result
    else:
        cloud, outcomes, info = _loopback(cfg, spec, recorder, run_dir, watch, timeout)
    train_wall = time.perf_counter() - t0
    result = spec.finish(cfg, cloud, outcomes, recorder, run_dir)
    result.extra.update(info)
    if cfg.runtime.transport == "inprocess" and cloud.state:
        # the cloud's half of the model, next to the device's (a loopback cloud saves
        # its own in cloud/): `cotune.export` joins them
        result.saved.setdefault(CLOUD_STATE_FILE, cloud.state)
    networks = {o.device_id: o.result.extra["network"] for o in outcomes
                if isinstance(o.result.extra.get("network"), dict)}  # fmt: skip
    if networks and "network" not in result.extra:
        # devices run side by side: the run waits for the slowest one's network
        offset = max(float(n.get("offset_s", 0.0)) for n in networks.values())
        result.extra["network"] = {"offset_s": offset, "devices": networks}
    if spec.devices(cfg) > 1:
        result.extra["train_wall_s"] = train_wall
        _log_final(
            recorder, result, t0, steps=max(int(o.result.extra.get("steps", 0)) for o in outcomes)
        )
    return result


def _log_final(
    recorder: Recorder, result: MethodResult, t0: float, steps: int | None = None
) -> None:
    step = steps if steps is not None else int(result.extra.get("steps", 0))
    wall = time.perf_counter() - t0
    network = result.extra.get("network")
    offset = float(network.get("offset_s", 0.0)) if isinstance(network, dict) else 0.0
    recorder.log_eval(
        {"step": step, **result.metrics, "bytes_up": result.bytes_up,
         "bytes_down": result.bytes_down, "wall_s": wall, "projected_wall_s": wall + offset}
    )  # fmt: skip


# ----------------------------------------------------------------------------- in process


def run_in_process(
    cfg: Config, spec: SplitSpec, recorder: Recorder, run_dir: Path | None
) -> tuple[CloudService, list[DeviceOutcome]]:
    """The cloud service in this process and every device against it (one device in
    this thread, several each in a thread); returns the service and the outcomes."""
    ids = device_ids(cfg, spec)
    tokens = {i: secrets.token_urlsafe(24) for i in ids}
    service = spec.cloud(cfg)
    endpoint = CloudEndpoint(service, TokenBook(tokens))
    if len(ids) == 1:
        i = ids[0]
        result = spec.device(
            cfg, i, inprocess_connector(cfg, endpoint, i, tokens[i]), recorder, run_dir
        )
        outcomes = [outcome_of(i, result, spec)]
    else:
        shared = _SharedRecorder(recorder)
        results: dict[int, MethodResult | BaseException] = {}

        def work(i: int) -> None:
            try:
                connect = inprocess_connector(cfg, endpoint, i, tokens[i])
                results[i] = spec.device(cfg, i, connect, shared, None)
            except BaseException as err:  # reported below
                results[i] = err

        threads = [threading.Thread(target=work, args=(i,), name=f"device-{i}") for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = {i: r for i, r in results.items() if isinstance(r, BaseException)}
        if failed:
            first = failed[min(failed)]
            raise RuntimeError(f"device(s) {sorted(failed)} failed: {first!r}") from first
        outcomes = [outcome_of(i, results[i], spec) for i in ids]  # type: ignore[arg-type]
    return service, outcomes


# ----------------------------------------------------------------------------- loopback


@contextmanager
def _link_files(cfg: Config, ids: list[int]) -> Iterator[tuple[Path, Path, dict[int, str]]]:
    """A private folder with the tokens and the config the cloud and devices share."""
    with tempfile.TemporaryDirectory(prefix="cotune-link-") as tmp:
        folder = Path(tmp)
        tokens_path = folder / "tokens"
        tokens = write_token_file(tokens_path, ids)
        shared = cfg.model_copy(deep=True)
        shared.runtime.tokens = str(tokens_path)
        shared.runtime.transport = "grpc"
        shared.runtime.cloud = None
        shared.runtime.tls_cert = shared.runtime.tls_key = shared.runtime.tls_ca = None
        cfg_path = folder / "config.toml"
        cfg_path.write_text(to_toml(shared))
        yield folder, cfg_path, tokens


def _cloud_outcome(out: Path) -> CloudOutcome:
    info = (
        json.loads((out / CLOUD_INFO_FILE).read_text()) if (out / CLOUD_INFO_FILE).exists() else {}
    )
    state = load_file(str(out / CLOUD_STATE_FILE)) if (out / CLOUD_STATE_FILE).exists() else {}
    return CloudOutcome(state, int(info.get("steps", 0)), int(info.get("trainable_params", 0)))


def _loopback(
    cfg: Config,
    spec: SplitSpec,
    recorder: Recorder,
    run_dir: Path | None,
    watch: Watch | None,
    timeout: float | None,
) -> tuple[CloudOutcome, list[DeviceOutcome], dict[str, Any]]:
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="cotune-split-") as tmp:
            return _loopback(cfg, spec, recorder, Path(tmp), watch, timeout)
    ids = device_ids(cfg, spec)
    with _link_files(cfg, ids) as (link, cfg_path, tokens):
        port_file = link / "cloud.port"
        cloud = Child(
            cotune_command("cloud", "--config", str(cfg_path), "--listen", f"{LOOPBACK}:0",
                           "--port-file", str(port_file), "--out", str(run_dir / "cloud")),
            run_dir / "cloud.log",
        )  # fmt: skip
        devices: dict[int, Child] = {}
        try:
            wait = max(STARTUP_TIMEOUT_S, cfg.runtime.connect_timeout_s)
            port = int(cloud.wait_for_file(port_file, wait, "the loopback cloud"))
            address = f"{LOOPBACK}:{port}"
            if len(ids) == 1:
                i = ids[0]
                connect = grpc_connector(cfg, address, tokens[i], i)
                results = {i: spec.device(cfg, i, connect, recorder, run_dir)}
            else:
                for i in ids:
                    devices[i] = Child(
                        cotune_command("device", "--config", str(cfg_path), "--cloud", address,
                                       "--device-id", str(i), "--out", str(run_dir / f"device-{i}")),
                        run_dir / f"device-{i}.log",
                    )  # fmt: skip
                limit = time.monotonic() + (timeout or 10 * cfg.runtime.timeout_s)
                while any(d.alive() for d in devices.values()):
                    if watch is not None:
                        watch(devices, run_dir)
                    if time.monotonic() > limit:
                        raise UserError("split devices did not finish in time; see device-*.log")
                    time.sleep(0.5)
                results = {}
        finally:
            stop_all(list(devices.values()), grace=10.0)
            stop_all([cloud], grace=60.0)  # the cloud saves its tensors on SIGTERM
    codes: dict[int, int | None] = {}
    done: list[int] = []
    if devices:
        codes = {i: d.returncode for i, d in devices.items()}
        done = [i for i, c in codes.items() if c == 0]
        if not done:
            raise UserError(
                f"no device finished (exit codes {codes}); device {ids[0]}:\n"
                + devices[ids[0]].tail()
            )
        for i in done:
            folder = run_dir / f"device-{i}"
            result = MethodResult.from_summary(json.loads((folder / SUMMARY_FILE).read_text()))
            result.saved = {spec.device_file: load_file(str(folder / spec.device_file))}
            results[i] = result
        log.info("device exit codes: %s", codes)
    outcomes = [outcome_of(i, r, spec) for i, r in sorted(results.items())]
    info = {"exit_codes": codes, "finished_devices": done} if devices else {}
    return _cloud_outcome(run_dir / "cloud"), outcomes, info
