"""The split cloud as a service: `cotune cloud`, and a loopback cloud for `cotune run`.

`CloudServer` serves a `SplitCloud` over gRPC (TLS when `runtime.tls_cert` and
`runtime.tls_key` are set; the token file `runtime.tokens` is required). `serve_forever`
runs it until SIGINT/SIGTERM and then saves the cloud's trainable tensors and its byte
counts to `--out`. `loopback_cloud` starts `cotune cloud` as a child process on
127.0.0.1 with a fresh random token, for `cotune run` with `runtime.transport = "grpc"`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from cotune.config import Config, to_toml
from cotune.errors import ConfigError, UserError
from cotune.link.auth import TokenBook, read_token_file, write_token_file
from cotune.link.grpc_transport import TlsFiles, start_server
from cotune.link.service import CloudEndpoint
from cotune.methods.split.cloud import SplitCloud
from cotune.methods.training import seed_everything, set_threads

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0


def cloud_service(cfg: Config) -> Any:
    """The service `cotune cloud` runs for the config's method (split or splitfed)."""
    if cfg.method == "splitfed":
        from cotune.methods.splitfed import SplitFedCloud

        return SplitFedCloud(cfg)
    return SplitCloud(cfg)


class CloudServer:
    """A `SplitCloud` behind tokens on a gRPC port."""

    def __init__(self, cfg: Config, listen: str, tokens: TokenBook | None = None) -> None:
        rt = cfg.runtime
        if tokens is None:
            if rt.tokens is None:
                raise ConfigError(
                    "runtime.tokens: the cloud needs a token file with one "
                    "'<device id> <token>' line per device (see docs/split.md)"
                )
            tokens = TokenBook.load(rt.tokens)
        self.tls = None
        if rt.tls_cert or rt.tls_key:
            self.tls = TlsFiles(cert=rt.tls_cert, key=rt.tls_key)
        seed_everything(cfg.seed)
        set_threads(cfg.train)
        self.cfg = cfg
        self.tokens = tokens
        self.cloud = cloud_service(cfg)
        self.endpoint = CloudEndpoint(self.cloud, tokens)
        self.server, self.port = start_server(
            self.endpoint,
            listen,
            tls=self.tls,
            max_message_bytes=int(rt.max_message_mb * 1024 * 1024),
            max_workers=max(8, 2 * len(tokens.device_ids()) + 2),
        )
        self.host = listen.rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace).wait()

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.cloud.steps,
            "trainable_params": self.cloud.trainable_count(),
            "refused_streams": self.endpoint.refused,
            **self.endpoint.meter.snapshot(),
        }

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        state = self.cloud.trainable_state()
        if state:
            save_file(state, str(out / "cloud_trainable.safetensors"))
        (out / "cloud.json").write_text(json.dumps(self.summary(), indent=2) + "\n")


def serve_forever(
    cfg: Config, listen: str, *, out: str | Path | None = None, port_file: str | Path | None = None
) -> int:
    """Run the cloud until SIGINT or SIGTERM (what `cotune cloud` does)."""
    server = CloudServer(cfg, listen)
    tls = "TLS" if server.tls else "no TLS"
    print(
        f"cotune cloud: listening on {server.address} ({tls}); devices "
        f"{', '.join(map(str, server.tokens.device_ids()))}; Ctrl-C stops",
        flush=True,
    )
    if port_file is not None:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(str(server.port))
        tmp.replace(port_file)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    server.stop()
    if out is not None:
        server.save(Path(out))
    print(f"cotune cloud: stopped after {server.cloud.steps} steps", flush=True)
    return 0


@contextmanager
def loopback_cloud(cfg: Config, run_dir: Path | None = None) -> Iterator[tuple[str, str]]:
    """Start `cotune cloud` on 127.0.0.1 (a free port) for this config; yields
    (address, token) for device `runtime.device_id`, stops the process on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="cotune-cloud-"))
    proc: subprocess.Popen[bytes] | None = None
    log_path = (run_dir / "cloud.log") if run_dir is not None else tmp / "cloud.log"
    try:
        tokens_path = tmp / "tokens"
        write_token_file(tokens_path, [cfg.runtime.device_id])
        token = read_token_file(tokens_path)[cfg.runtime.device_id]
        cloud_cfg = cfg.model_copy(deep=True)
        cloud_cfg.runtime.tokens = str(tokens_path)
        cloud_cfg.runtime.tls_cert = cloud_cfg.runtime.tls_key = None  # loopback: no TLS
        cfg_path = tmp / "config.toml"
        cfg_path.write_text(to_toml(cloud_cfg))
        port_file = tmp / "port"
        cmd = [
            sys.executable, "-m", "cotune", "cloud", "--config", str(cfg_path),
            "--listen", "127.0.0.1:0", "--port-file", str(port_file),
        ]  # fmt: skip
        if run_dir is not None:
            cmd += ["--out", str(run_dir / "cloud")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        wait = max(STARTUP_TIMEOUT_S, cfg.runtime.connect_timeout_s)
        deadline = time.monotonic() + wait
        while not port_file.exists():
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise UserError(f"the loopback cloud exited with status {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise UserError(
                    f"the loopback cloud did not start within {wait:.0f} s "
                    "(raise runtime.connect_timeout_s on a busy machine)"
                )
            time.sleep(0.05)
        yield f"127.0.0.1:{int(port_file.read_text())}", token
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
