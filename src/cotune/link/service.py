"""The cloud side of a link, independent of the transport that carries it.

A `Service` (e.g. the split method's cloud) opens one `Session` per device stream. A
session answers each device message with exactly one cloud message, optionally with a
follow-up (`after`) that runs once the answer is on its way (e.g. the cloud's optimiser
step, overlapping the device's backward pass).

`CloudEndpoint` puts a service behind per-device tokens and turns exceptions into
`Error` messages, so every transport refuses and reports the same things the same way:
a wrong or missing token ends the stream before any message is read; a malformed or
out-of-order message gets an `Error` answer and the stream (and every other device's
stream) goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from cotune.link.accounting import ByteMeter
from cotune.link.auth import TokenBook, parse_metadata
from cotune.link.errors import AuthError, LinkError
from cotune.link.proto import pb

log = logging.getLogger(__name__)

After = Callable[[], None] | None


class Session(Protocol):
    def handle(self, msg: pb.DeviceMessage) -> tuple[pb.CloudMessage, After]:
        """Answer one message; raise `LinkError` to answer with an error instead."""

    def close(self) -> None:
        """The stream ended (normally, by a disconnect, or replaced by a new one)."""


class Service(Protocol):
    def open_session(self, device_id: int) -> Session: ...


def error_message(code: str, message: str) -> pb.CloudMessage:
    return pb.CloudMessage(error=pb.Error(code=code, message=message))


class CloudEndpoint:
    """A service behind per-device bearer tokens; what every transport serves."""

    def __init__(self, service: Service, tokens: TokenBook) -> None:
        self.service = service
        self.tokens = tokens
        self.meter = ByteMeter()  # everything this cloud saw, all devices together
        self._lock = threading.Lock()
        self._active: dict[int, int] = {}  # device id -> stream generation
        self._generation = 0
        self.refused = 0

    def authenticate(self, metadata: list[tuple[str, str]] | tuple) -> int:
        """The device id of an authorised stream; `AuthError` otherwise."""
        device_id, token = parse_metadata(metadata)
        if device_id is None:
            with self._lock:
                self.refused += 1
            raise AuthError("no device id in the call metadata")
        if token is None or not self.tokens.check(device_id, token):
            with self._lock:
                self.refused += 1
            what = "missing" if token is None else "wrong"
            raise AuthError(f"device {device_id}: {what} bearer token")
        return device_id

    def open_stream(self, device_id: int) -> DeviceStream:
        """Start serving an authorised device. A newer stream of the same device
        supersedes this one (the old one is refused at its next message)."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._active[device_id] = generation
        return DeviceStream(self, device_id, generation, self.service.open_session(device_id))

    def _is_current(self, device_id: int, generation: int) -> bool:
        with self._lock:
            return self._active.get(device_id) == generation

    def _release(self, device_id: int, generation: int) -> None:
        with self._lock:
            if self._active.get(device_id) == generation:
                del self._active[device_id]

    def serve(
        self, device_id: int, requests: Iterator[pb.DeviceMessage]
    ) -> Iterator[pb.CloudMessage]:
        """Answer a device's stream message by message until it ends (gRPC servicer)."""
        stream = self.open_stream(device_id)
        try:
            for msg in requests:
                reply, after = stream.handle(msg)
                try:
                    yield reply
                finally:
                    # Runs when the transport asks for the next answer and also when the
                    # stream is cancelled while this answer is in flight: a step the cloud
                    # answered is always applied, and always before the device is released
                    # (so `active_devices()` never lists a device whose step is pending).
                    stream.run(after)
                if reply.WhichOneof("kind") == "error" and reply.error.code == "ABORTED":
                    return
        finally:
            stream.close()

    def active_devices(self) -> list[int]:
        with self._lock:
            return sorted(self._active)


class DeviceStream:
    """One device's stream on the endpoint: error wrapping around its session."""

    def __init__(
        self, endpoint: CloudEndpoint, device_id: int, generation: int, session: Session
    ) -> None:
        self.endpoint = endpoint
        self.device_id = device_id
        self.generation = generation
        self.session = session
        self._closed = False

    def handle(self, msg: pb.DeviceMessage) -> tuple[pb.CloudMessage, After]:
        if not self.endpoint._is_current(self.device_id, self.generation):
            return error_message("ABORTED", "a newer stream of this device replaced this one"), None
        try:
            return self.session.handle(msg)
        except LinkError as err:
            return error_message(err.code, err.message), None
        except Exception as err:  # a bug: keep serving, tell the device
            log.exception("device %s: internal error", self.device_id)
            return error_message("INTERNAL", f"{type(err).__name__}: {err}"), None

    def run(self, after: After) -> None:
        if after is None:
            return
        try:
            after()
        except Exception:
            log.exception("device %s: follow-up failed", self.device_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.session.close()
        finally:
            self.endpoint._release(self.device_id, self.generation)
