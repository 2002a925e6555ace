"""Device-side transports: one ordered, bidirectional stream from a device to the cloud.

`Transport.request(msg)` sends one `DeviceMessage` and returns the cloud's answer,
raising the matching `LinkError` when the answer is an `Error`. Every transport counts
the bytes it puts on the wire in its `meter` (see `cotune.link.accounting`).

`InProcessTransport` runs the cloud's `CloudEndpoint` in this process: messages are
serialized, counted, and parsed again exactly as over gRPC (same auth check, same size
limit, same validation), so simulation and deployment report the same bytes.

A transport given an `EmulatedLink` (`[link.network]`) hands it every message it counts,
on the device's side: up before the message leaves, down as the answer arrives (see
`cotune.link.emulation`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

from cotune.link.accounting import DOWN, UP, ByteMeter, Tap
from cotune.link.auth import call_metadata
from cotune.link.emulation import EmulatedLink
from cotune.link.errors import LinkClosed, LinkError, TooLarge, error_for
from cotune.link.proto import pb
from cotune.link.service import CloudEndpoint, DeviceStream

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Transport(ABC):
    meter: ByteMeter
    network: EmulatedLink | None = None

    def _carry(self, direction: str, data: bytes) -> None:
        """The emulated network's share of one message (nothing without one)."""
        if self.network is not None:
            self.network.carry(direction, data, self.meter.phase)

    @abstractmethod
    def send(self, msg: pb.DeviceMessage) -> None: ...

    @abstractmethod
    def recv(self, timeout: float | None = None) -> pb.CloudMessage: ...

    @abstractmethod
    def close(self) -> None: ...

    def request(self, msg: pb.DeviceMessage, timeout: float | None = None) -> pb.CloudMessage:
        """Send `msg`, wait for the answer; an `Error` answer raises its `LinkError`."""
        self.send(msg)
        reply = self.recv(timeout)
        if reply.WhichOneof("kind") == "error":
            raise error_for(reply.error.code, reply.error.message)
        return reply

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessTransport(Transport):
    """The cloud endpoint in this process; serialization and accounting as over gRPC."""

    def __init__(
        self,
        endpoint: CloudEndpoint,
        device_id: int,
        token: str | None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tap: Tap | None = None,
        network: EmulatedLink | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.network = network
        self.metadata = call_metadata(device_id, token)
        self.max_message_bytes = max_message_bytes
        self.meter = ByteMeter(tap)
        self._answers: deque[pb.CloudMessage] = deque()
        self._stream: DeviceStream | None = None
        self._broken: LinkError | None = None
        self._closed = False

    def _open(self) -> DeviceStream:
        # As over gRPC: metadata goes out with the first message; a refused stream ends.
        self.meter.record_metadata(UP, self.metadata)
        try:
            device_id = self.endpoint.authenticate(self.metadata)
        except LinkError as err:
            self._broken = err
            raise
        return self.endpoint.open_stream(device_id)

    def send(self, msg: pb.DeviceMessage) -> None:
        if self._closed:
            raise LinkClosed("the link is closed")
        if self._broken is not None:
            raise self._broken
        data = msg.SerializeToString()
        if len(data) > self.max_message_bytes:
            raise TooLarge(
                f"message of {len(data)} bytes is over the {self.max_message_bytes}-byte limit"
            )
        if self._stream is None:
            self._stream = self._open()
        self.meter.record(UP, data)
        self.endpoint.meter.record(UP, data)
        self._carry(UP, data)
        reply, after = self._stream.handle(pb.DeviceMessage.FromString(data))
        rdata = reply.SerializeToString()
        if len(rdata) > self.max_message_bytes:
            self._broken = TooLarge(
                f"the cloud's answer of {len(rdata)} bytes is over the "
                f"{self.max_message_bytes}-byte limit"
            )
            self.close()
            raise self._broken
        self.meter.record(DOWN, rdata)
        self.endpoint.meter.record(DOWN, rdata)
        self._carry(DOWN, rdata)
        self._answers.append(pb.CloudMessage.FromString(rdata))
        self._stream.run(after)

    def recv(self, timeout: float | None = None) -> pb.CloudMessage:
        if not self._answers:
            raise LinkClosed("no answer is pending")
        return self._answers.popleft()

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.close()
            self._stream = None
