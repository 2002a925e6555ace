"""`split`: split fine-tuning (SFT, METHODS.md section 1).

One device and one cloud train one model cut at `split.cut`: the device runs the
embeddings and the first layers (and the head with `split.labels = "device"`), the
cloud the rest; activations go up, gradients come down, encoded by `link.codec`, over
`runtime.transport`:

- `inprocess`: the cloud runs in this process behind the same endpoint, serialization
  and byte accounting as over gRPC;
- `grpc` with `runtime.cloud` unset: a `cotune cloud` process is started on loopback;
- `grpc` with `runtime.cloud = "host:port"`: this process is a device of a cloud already
  running there (what `cotune device` does).

Building blocks for other split methods (e.g. splitfed): `SplitCloud` (a link service
serving many devices), `SplitDevice`, `train_device`, `build_split`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from cotune.config import Config
from cotune.link.auth import TokenBook
from cotune.link.grpc_transport import GrpcTransport, TlsFiles
from cotune.link.service import CloudEndpoint
from cotune.link.transport import InProcessTransport, Transport
from cotune.methods.result import MethodResult, Recorder
from cotune.methods.split.cloud import SplitCloud, SplitSession
from cotune.methods.split.common import RngStream, build_split, fingerprint
from cotune.methods.split.device import SplitDevice


def max_message_bytes(cfg: Config) -> int:
    return int(cfg.runtime.max_message_mb * 1024 * 1024)


def device_tls(cfg: Config) -> TlsFiles | None:
    rt = cfg.runtime
    return TlsFiles(ca=rt.tls_ca, server_name=rt.tls_server_name) if rt.tls_ca else None


def device_token(cfg: Config) -> str:
    from cotune.errors import ConfigError

    if cfg.runtime.tokens is None:
        raise ConfigError(
            "runtime.tokens: a device needs the token file its cloud was given "
            "(one '<device id> <token>' line per device; only its own line is needed)"
        )
    book = TokenBook.load(cfg.runtime.tokens)
    if cfg.runtime.device_id not in book:
        raise ConfigError(
            f"runtime.tokens: {cfg.runtime.tokens!r} has no token for device "
            f"{cfg.runtime.device_id}; it lists devices {book.device_ids()}"
        )
    return book.token(cfg.runtime.device_id)


def grpc_factory(cfg: Config, address: str, token: str) -> Callable[[], Transport]:
    def connect() -> Transport:
        return GrpcTransport(
            address,
            cfg.runtime.device_id,
            token,
            tls=device_tls(cfg),
            max_message_bytes=max_message_bytes(cfg),
            connect_timeout=cfg.runtime.connect_timeout_s,
        )

    return connect


def inprocess_factory(cfg: Config, cloud: SplitCloud | None = None) -> Callable[[], Transport]:
    """A cloud in this process, behind a fresh random token, reached in-process."""
    token = secrets.token_urlsafe(24)
    device_id = cfg.runtime.device_id
    endpoint = CloudEndpoint(cloud or SplitCloud(cfg), TokenBook({device_id: token}))

    def connect() -> Transport:
        return InProcessTransport(
            endpoint, device_id, token, max_message_bytes=max_message_bytes(cfg)
        )

    return connect


def run(cfg: Config, recorder: Recorder, run_dir: Path | None = None) -> MethodResult:
    from cotune.methods.split.loop import train_device  # data loading: the device only

    if cfg.runtime.transport == "inprocess":
        return train_device(cfg, recorder, inprocess_factory(cfg), run_dir)
    if cfg.runtime.cloud is not None:
        factory = grpc_factory(cfg, cfg.runtime.cloud, device_token(cfg))
        return train_device(cfg, recorder, factory, run_dir)
    from cotune.runtime.split_cloud import loopback_cloud  # starts a `cotune cloud` process

    with ExitStack() as stack:
        address, token = stack.enter_context(loopback_cloud(cfg, run_dir))
        return train_device(cfg, recorder, grpc_factory(cfg, address, token), run_dir)


__all__ = [
    "RngStream",
    "SplitCloud",
    "SplitDevice",
    "SplitSession",
    "build_split",
    "fingerprint",
    "grpc_factory",
    "inprocess_factory",
    "run",
]
