"""Errors on the link. Each carries a gRPC-style status code so both transports report
the same failure the same way."""

from __future__ import annotations


class LinkError(Exception):
    """Something went wrong on the link; `code` is a gRPC status code name."""

    code = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class MalformedMessage(LinkError):
    """A message's shape, dtype, size or values are not what the protocol allows."""

    code = "INVALID_ARGUMENT"


class AuthError(LinkError):
    """Missing or wrong device token: the stream is refused before any message is read."""

    code = "UNAUTHENTICATED"


class ProtocolError(LinkError):
    """A valid message at the wrong moment (e.g. a step out of order, a config mismatch)."""

    code = "FAILED_PRECONDITION"


class TooLarge(LinkError):
    """A message is over the configured size limit."""

    code = "RESOURCE_EXHAUSTED"


class LinkClosed(LinkError):
    """The other side went away, or no answer came within the timeout."""

    code = "UNAVAILABLE"


class RemoteError(LinkError):
    """The other side answered with an error message."""


def error_for(code: str, message: str) -> LinkError:
    """The exception class matching a status `code` (for errors reported by the peer)."""
    classes: dict[str, type[LinkError]] = {
        "INVALID_ARGUMENT": MalformedMessage,
        "UNAUTHENTICATED": AuthError,
        "FAILED_PRECONDITION": ProtocolError,
        "RESOURCE_EXHAUSTED": TooLarge,
        "UNAVAILABLE": LinkClosed,
    }
    cls = classes.get(code, RemoteError)
    return cls(message, code)
