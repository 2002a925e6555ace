"""Per-device bearer tokens.

A token file has one device per line, `<device id> <token>`; blank lines and lines
starting with `#` are ignored. The cloud loads the whole file; a device reads the line
with its id. `write_token_file` makes one with random tokens (mode 0600); a token file
that group or others can read is refused (the error names the `chmod` to run).

The cloud keeps no token in clear: `TokenBook` holds HMAC-SHA256 digests of the tokens
under a random key drawn when it is made, and checks a presented token by comparing its
digest in constant time (the same work for unknown devices, and for any token length).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cotune.errors import ConfigError

DEVICE_ID_KEY = "cotune-device-id"
AUTH_KEY = "authorization"
BEARER = "Bearer "


class TokenBook:
    """Keyed hashes of the devices' tokens: what the cloud checks streams against."""

    def __init__(self, tokens: dict[int, str]) -> None:
        if any(not t for t in tokens.values()):
            raise ValueError("empty tokens are not allowed")
        self._key = secrets.token_bytes(32)
        self._digests = {d: self._digest(t) for d, t in tokens.items()}
        self._nobody = self._digest(secrets.token_urlsafe(24))

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    @classmethod
    def load(cls, path: str | Path) -> TokenBook:
        return cls(read_token_file(path))

    def __contains__(self, device_id: int) -> bool:
        return device_id in self._digests

    def check(self, device_id: int, token: str) -> bool:
        """Whether `token` is `device_id`'s (constant time in the token and the id)."""
        expected = self._digests.get(device_id)
        same = hmac.compare_digest(expected or self._nobody, self._digest(token))
        return same and expected is not None

    def device_ids(self) -> list[int]:
        return sorted(self._digests)


def check_private(path: Path, what: str = "runtime.tokens") -> None:
    """Refuse a secret file that group or others may read (or write)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{what}: {str(path)!r} is readable by group or others (mode {mode:04o}); a "
            f"secret file must be private to its owner (mode 0600): run `chmod 600 {path}`"
        )


def read_token_file(path: str | Path) -> dict[int, str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"runtime.tokens: token file {str(p)!r} does not exist; it needs one line "
            "'<device id> <token>' per device"
        )
    check_private(p)
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


def read_device_token(path: str | Path, device_id: int) -> str:
    """A device's own token from a token file (which may list only that device)."""
    tokens = read_token_file(path)
    if device_id not in tokens:
        raise ConfigError(
            f"runtime.tokens: {str(path)!r} has no token for device {device_id}; it lists "
            f"devices {sorted(tokens)}"
        )
    return tokens[device_id]


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
