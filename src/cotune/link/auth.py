"""Per-device bearer tokens.

A token file has one device per line, `<device id> <token>`; blank lines and lines
starting with `#` are ignored. The cloud loads the whole file; a device reads the line
with its id. Tokens are compared in constant time. `write_token_file` makes one with
random tokens (mode 0600).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from cotune.errors import ConfigError

DEVICE_ID_KEY = "cotune-device-id"
AUTH_KEY = "authorization"
BEARER = "Bearer "


class TokenBook:
    def __init__(self, tokens: dict[int, str]) -> None:
        if any(not t for t in tokens.values()):
            raise ValueError("empty tokens are not allowed")
        self._tokens = dict(tokens)

    @classmethod
    def load(cls, path: str | Path) -> TokenBook:
        return cls(read_token_file(path))

    def __contains__(self, device_id: int) -> bool:
        return device_id in self._tokens

    def token(self, device_id: int) -> str:
        return self._tokens[device_id]

    def check(self, device_id: int, token: str) -> bool:
        expected = self._tokens.get(device_id)
        # compare against something even for unknown ids, so timing does not tell
        return hmac.compare_digest((expected or "\0").encode(), token.encode()) and bool(expected)

    def device_ids(self) -> list[int]:
        return sorted(self._tokens)


def read_token_file(path: str | Path) -> dict[int, str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"runtime.tokens: token file {str(p)!r} does not exist; it needs one line "
            "'<device id> <token>' per device"
        )
    tokens: dict[int, str] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise ConfigError(
                f"runtime.tokens: line {n} of {str(p)!r} is not '<device id> <token>'"
            )
        tokens[int(fields[0])] = fields[1]
    if not tokens:
        raise ConfigError(f"runtime.tokens: token file {str(p)!r} lists no devices")
    return tokens


def write_token_file(path: str | Path, device_ids: list[int]) -> dict[int, str]:
    """Create a token file with a fresh random token per device (readable by owner only)."""
    tokens = {d: secrets.token_urlsafe(24) for d in device_ids}
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# cotune device tokens: <device id> <token>\n")
        for d, t in tokens.items():
            f.write(f"{d} {t}\n")
    return tokens


def call_metadata(device_id: int, token: str | None) -> list[tuple[str, str]]:
    """The metadata a device sends when it opens its stream."""
    md = [(DEVICE_ID_KEY, str(device_id))]
    if token is not None:
        md.append((AUTH_KEY, BEARER + token))
    return md


def parse_metadata(pairs: list[tuple[str, str]] | tuple) -> tuple[int | None, str | None]:
    """(device id, token) from call metadata; None where absent or unreadable."""
    md = {k.lower(): v for k, v in pairs}
    raw_id = md.get(DEVICE_ID_KEY, "")
    device_id = int(raw_id) if raw_id.isdigit() else None
    auth = md.get(AUTH_KEY, "")
    token = auth[len(BEARER) :] if auth.startswith(BEARER) else None
    return device_id, token
