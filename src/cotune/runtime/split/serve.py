"""The cloud of a split method as a gRPC service: what `cotune cloud` runs.

`CloudServer` serves the method's cloud (`SplitSpec.cloud`, e.g. split's `SplitCloud`
or splitfed's `SplitFedCloud`) over gRPC, TLS when `runtime.tls_cert` and
`runtime.tls_key` are set; the token file `runtime.tokens` is required. `serve_forever`
runs it until SIGINT/SIGTERM and then saves the cloud's trainable tensors and its byte
counts to `--out` (`cloud_trainable.safetensors`, `cloud.json`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from cotune.config import Config
from cotune.errors import ConfigError
from cotune.link.auth import TokenBook
from cotune.link.grpc_transport import TlsFiles, is_loopback, start_server
from cotune.link.guard import Limits, StreamGuard
from cotune.link.service import CloudEndpoint
from cotune.methods import SplitSpec, get_spec, method_names, resolve
from cotune.methods.spec import CloudService
from cotune.training import seed_everything, set_threads

log = logging.getLogger(__name__)


CLOUD_STATE_FILE = "cloud_trainable.safetensors"
CLOUD_INFO_FILE = "cloud.json"


def cloud_service(cfg: Config) -> CloudService:
    """The service `cotune cloud` runs: the cloud the config's method declares."""
    spec = get_spec(cfg.method)
    if not isinstance(spec.runs, SplitSpec):
        split_methods = [m for m in method_names() if isinstance(get_spec(m).runs, SplitSpec)]
        raise ConfigError(
            f"`cotune cloud` serves split methods ({', '.join(split_methods)}); "
            f"the config says {cfg.method!r}"
        )
    return spec.runs.cloud(cfg)


class CloudServer:
    """A split method's cloud behind tokens on a gRPC port."""

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
        elif not is_loopback(listen):
            if not rt.insecure:
                raise ConfigError(
                    f"--listen {listen}: a cloud other machines reach serves TLS; set "
                    "runtime.tls_cert and runtime.tls_key (`cotune keys init KEYS --host "
                    "NAME` writes KEYS/server.crt and KEYS/server.key; devices trust "
                    "KEYS/ca.crt), or runtime.insecure=true to serve in clear"
                )
            log.warning("runtime.insecure: serving %s without TLS", listen)
        resolve(cfg)
        seed_everything(cfg.seed)
        set_threads(cfg.train)
        self.cfg = cfg
        self.tokens = tokens
        self.cloud = cloud_service(cfg)
        self.endpoint = CloudEndpoint(self.cloud, tokens)
        self.guard = StreamGuard(
            Limits(
                max_streams_per_device=rt.max_streams_per_device,
                messages_per_s=rt.max_messages_per_s,
                burst=max(1, int(2 * rt.max_messages_per_s)),
                idle_s=rt.stream_idle_s,
            )
        )
        self.server, self.port = start_server(
            self.endpoint,
            listen,
            tls=self.tls,
            max_message_bytes=int(rt.max_message_mb * 1024 * 1024),
            max_workers=max(8, rt.max_streams_per_device * len(tokens.device_ids()) + 4),
            guard=self.guard,
        )
        self.host = listen.rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace).wait()
        self.guard.stop()

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.cloud.steps,
            "trainable_params": self.cloud.trainable_count(),
            "refused_streams": self.endpoint.refused + self.guard.refused_streams,
            "stalled_streams": self.guard.stalled_streams,
            "rate_limited": self.guard.rate_limited,
            **self.endpoint.meter.snapshot(),
        }

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        state = self.cloud.trainable_state()
        if state:
            save_file(state, str(out / CLOUD_STATE_FILE))
        (out / CLOUD_INFO_FILE).write_text(json.dumps(self.summary(), indent=2) + "\n")


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
