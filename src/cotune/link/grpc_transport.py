"""The gRPC transport: one bidirectional stream per device (`cotune.link.v1.Link/Connect`).

Server side, `start_server` serves a `CloudEndpoint` on HOST:PORT (TLS when a
certificate and key are given), checking the bearer token before reading any message;
each stream runs in a worker thread, so many devices are served concurrently. Client
side, `GrpcTransport` is a device's stream. Both ends count bytes in their
(de)serializers, i.e. the exact bytes handed to gRPC, plus gRPC's 5-byte message prefix
(see `cotune.link.accounting`). Messages over `max_message_bytes` are refused by gRPC
with RESOURCE_EXHAUSTED, from their length prefix, before they are read; the server
parses a message only after it is charged to its device (see `cotune.link.guard`).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from cotune.errors import ConfigError
from cotune.link.accounting import DOWN, UP, ByteMeter, Tap
from cotune.link.auth import call_metadata
from cotune.link.emulation import EmulatedLink
from cotune.link.errors import (
    AuthError,
    LinkClosed,
    LinkError,
    MalformedMessage,
    TooLarge,
    error_for,
)
from cotune.link.guard import StreamGuard, Ticket
from cotune.link.proto import pb
from cotune.link.service import CloudEndpoint
from cotune.link.transport import DEFAULT_MAX_MESSAGE_BYTES, Transport

log = logging.getLogger(__name__)

SERVICE = "cotune.link.v1.Link"
METHOD = f"/{SERVICE}/Connect"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files. Server: `cert` + `key` (and `ca` is unused). Device: `ca` is the
    certificate (or CA) to trust; None trusts the system's roots. `server_name`
    overrides the name checked against the server's certificate."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file {path!r} does not exist")
    return p.read_bytes()


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def start_server(
    endpoint: CloudEndpoint,
    listen: str,
    *,
    tls: TlsFiles | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_workers: int = 16,
    guard: StreamGuard | None = None,
) -> tuple[grpc.Server, int]:
    """Serve `endpoint` on `listen` ("HOST:PORT"; port 0 picks one). Returns the started
    server and the bound port. `guard` (default limits when None) admits each device's
    streams and charges its messages before they are parsed."""

    guard = guard or StreamGuard()

    def serialize(msg: pb.CloudMessage) -> bytes:
        data = msg.SerializeToString()
        endpoint.meter.record(DOWN, data)
        return data

    def connect(requests, context):
        try:
            device_id = endpoint.authenticate(context.invocation_metadata())
        except AuthError as err:
            log.warning("refused a stream: %s (peer %s)", err.message, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, err.message)
            return
        try:
            ticket = guard.admit(device_id, context.cancel)
        except TooLarge as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, err.message)
            return
        try:
            messages = _decoded(requests, ticket, endpoint.meter)
            yield from endpoint.serve(device_id, _guarded(messages, device_id))
        except LinkError as err:  # over its rate, or not a DeviceMessage: cut off
            log.warning("device %s: %s (peer %s)", device_id, err.message, context.peer())
            context.abort(getattr(grpc.StatusCode, err.code), err.message)
        finally:
            ticket.close()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Connect": grpc.stream_stream_rpc_method_handler(
                connect, request_deserializer=None, response_serializer=serialize
            )
        },
    )
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cotune-link"),
        options=_options(max_message_bytes),
        maximum_concurrent_rpcs=max_workers,
    )
    server.add_generic_rpc_handlers((handler,))
    if tls is not None and (tls.cert or tls.key):
        if not (tls.cert and tls.key):
            raise ConfigError("runtime.tls_cert and runtime.tls_key must be given together")
        creds = grpc.ssl_server_credentials(
            [(_read(tls.key, "runtime.tls_key"), _read(tls.cert, "runtime.tls_cert"))]
        )
        port = server.add_secure_port(listen, creds)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise ConfigError(f"cannot listen on {listen!r} (address in use or invalid)")
    server.start()
    return server, port


def _decoded(requests, ticket: Ticket, meter: ByteMeter):  # type: ignore[no-untyped-def]
    """Raw messages -> `DeviceMessage`s: each is counted and charged to the device's
    rate before it is parsed; the stall clock restarts whenever the next is awaited."""
    while True:
        ticket.last = time.monotonic()
        data = next(requests, None)
        if data is None:
            return
        meter.record(UP, data)
        ticket.message(len(data))
        try:
            msg = pb.DeviceMessage.FromString(data)
        except DecodeError:
            raise MalformedMessage("the message is not a cotune DeviceMessage") from None
        yield msg


def _guarded(requests, device_id: int):  # type: ignore[no-untyped-def]
    """The request iterator, ending quietly when the device goes away mid-stream."""
    try:
        yield from requests
    except grpc.RpcError:
        log.info("device %s: stream ended by the peer", device_id)


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


CLOSE_TIMEOUT_S = 30.0
_EOF = object()
_CLOSE = object()


class GrpcTransport(Transport):
    """A device's stream to a cloud at `address` ("HOST:PORT")."""

    def __init__(
        self,
        address: str,
        device_id: int,
        token: str | None,
        *,
        tls: TlsFiles | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tap: Tap | None = None,
        connect_timeout: float = 60.0,
        network: EmulatedLink | None = None,
    ) -> None:
        self.address = address
        self.network = network
        self.connect_timeout = connect_timeout
        self.metadata = call_metadata(device_id, token)
        self.meter = ByteMeter(tap)
        options: list[tuple[str, object]] = list(_options(max_message_bytes))
        if tls is not None:
            root = _read(tls.ca, "runtime.tls_ca") if tls.ca else None
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=root), options
            )
        else:
            if not is_loopback(address):
                log.warning(
                    "connecting to %s without TLS: the device token and activations travel "
                    "in clear; set runtime.tls_ca to use TLS",
                    address,
                )
            self._channel = grpc.insecure_channel(address, options)
        self._connect = self._channel.stream_stream(
            METHOD, request_serializer=self._serialize, response_deserializer=self._deserialize
        )
        self._outgoing: queue.Queue[object] = queue.Queue()
        self._incoming: queue.Queue[object] = queue.Queue()
        self._call: grpc.Future | None = None
        self._reader: threading.Thread | None = None
        self._closed = False

    def _serialize(self, msg: pb.DeviceMessage) -> bytes:
        data = msg.SerializeToString()
        self.meter.record(UP, data)
        self._carry(UP, data)  # gRPC's sending thread: the bytes leave after the pacing
        return data

    def _deserialize(self, data: bytes) -> pb.CloudMessage:
        self.meter.record(DOWN, data)
        self._carry(DOWN, data)  # the reader thread: the answer arrives after the pacing
        return pb.CloudMessage.FromString(data)

    def _requests(self):
        while True:
            item = self._outgoing.get()
            if item is _CLOSE:
                return
            yield item

    def _read(self) -> None:
        assert self._call is not None
        try:
            for answer in self._call:
                self._incoming.put(answer)
        except grpc.RpcError as err:
            code = err.code()
            if not (self._closed and code == grpc.StatusCode.CANCELLED):
                name = code.name if code is not None else "UNKNOWN"
                self._incoming.put(error_for(name, err.details() or name))
        finally:
            self._incoming.put(_EOF)

    def _open(self) -> None:
        try:  # a cloud that is still starting is waited for, up to connect_timeout
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise LinkClosed(
                f"could not reach the cloud at {self.address} within {self.connect_timeout:g} s"
            ) from None
        self.meter.record_metadata(UP, self.metadata)
        self._call = self._connect(self._requests(), metadata=self.metadata)
        self._reader = threading.Thread(target=self._read, name="cotune-link-reader", daemon=True)
        self._reader.start()

    def send(self, msg: pb.DeviceMessage) -> None:
        if self._closed:
            raise LinkClosed("the link is closed")
        if self._call is None:
            self._open()
        self._outgoing.put(msg)

    def recv(self, timeout: float | None = None) -> pb.CloudMessage:
        try:
            item = self._incoming.get(timeout=timeout)
        except queue.Empty:
            raise LinkClosed(
                f"no answer from the cloud at {self.address} within {timeout} s"
            ) from None
        if item is _EOF:
            self._incoming.put(_EOF)  # stay closed for later calls
            raise LinkClosed(f"the cloud at {self.address} closed the stream")
        if isinstance(item, LinkError):
            self._incoming.put(_EOF)
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._outgoing.put(_CLOSE)  # half-close: the cloud finishes its work and ends
        if self._reader is not None:
            self._reader.join(timeout=CLOSE_TIMEOUT_S)
            if self._reader.is_alive() and self._call is not None:
                self._call.cancel()
                self._reader.join(timeout=CLOSE_TIMEOUT_S)
        self._channel.close()

    def abort(self) -> None:
        """Drop the stream at once, as a crashing device would (tests, fault injection)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._channel.close()
