"""Whether the Hugging Face hub may be used from this process, and why not.

The policy (every cotune process, and the children it starts, which inherit the
environment):

- packaged, zoo and local models never touch the network (they load with
  `local_files_only`);
- a hub model id is downloaded unless the user said offline: `cotune --offline` (which
  sets `COTUNE_OFFLINE=1` and `HF_HUB_OFFLINE=1` for this process and its children) or
  `HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1` in the environment. A 3-second probe of
  the endpoint first avoids huggingface_hub retrying a dead network for ~30 s; when the
  hub cannot be reached the local HF cache is used;
- data sets stay offline unless the user names a hub data set (`hf:<id>`), or opts in to
  the hub copy of a packaged task (GLUE, E2E without `task.data_dir`) with
  `HF_DATASETS_OFFLINE=0`.

`access()` says which of the two reasons keeps the hub out: the user's choice
(`offline because --offline was given`) or the network (`the hub could not be reached:
...`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
# set by `cotune --offline`, so that messages (here and in child processes) can name it
OFFLINE_FLAG = "COTUNE_OFFLINE"
DEFAULT_ENDPOINT = "https://huggingface.co"

_PROBE_FAILURES: dict[str, str] = {}  # endpoint -> why the last probe failed


def offline_by_env(*variables: str) -> str | None:
    """The first of `variables` (default HF_HUB_OFFLINE) set to a true value, or None."""
    for var in variables or ("HF_HUB_OFFLINE",):
        if os.environ.get(var, "").strip().lower() in TRUE:
            return var
    return None


def go_offline() -> None:
    """`cotune --offline`: this process and every child it starts never use the hub.

    Call before transformers / huggingface_hub are imported (they read HF_HUB_OFFLINE
    once, at import); cotune's own checks read the environment at every call."""
    os.environ[OFFLINE_FLAG] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def offline_reason() -> str | None:
    """Why the user has put the hub off limits ("--offline was given", "HF_HUB_OFFLINE=1
    was given"), or None when the hub may be used."""
    if os.environ.get(OFFLINE_FLAG, "").strip().lower() in TRUE:
        return "--offline was given"
    var = offline_by_env("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if var is not None:
        return f"{var}=1 was given"
    return None


def endpoint() -> str:
    """The hub's address (HF_ENDPOINT, as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "huggingface.co", parsed.port or (
        80 if parsed.scheme == "http" else 443
    )


@lru_cache(maxsize=4)
def reachable(endpoint: str = DEFAULT_ENDPOINT) -> bool:
    """Whether `endpoint` accepts a TCP connection within 3 s (checked once per process)."""
    host, port = _host_port(endpoint)
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError as err:
        _PROBE_FAILURES[endpoint] = f"{host}:{port}: {err or type(err).__name__}"
        return False


def unreachable_reason(url: str | None = None) -> str | None:
    """Why the hub at `url` (default `endpoint()`) cannot be reached, or None if it can."""
    url = url or endpoint()
    if reachable(url):
        return None
    host, port = _host_port(url)
    return _PROBE_FAILURES.get(url, f"{host}:{port} accepted no connection within 3 s")


@dataclass(frozen=True)
class Access:
    """Whether this process may download from the hub: `offline` is the user's reason
    for not doing so, `unreachable` the network's (at most one is set)."""

    offline: str | None = None
    unreachable: str | None = None

    @property
    def online(self) -> bool:
        return self.offline is None and self.unreachable is None

    def why_not(self) -> str:
        """The sentence an error message gives (empty when online)."""
        if self.offline is not None:
            return f"offline because {self.offline}"
        if self.unreachable is not None:
            return f"the hub could not be reached: {self.unreachable}"
        return ""


def access(url: str | None = None) -> Access:
    """Whether the hub may be used now; the network is probed only when the user has not
    said offline."""
    reason = offline_reason()
    if reason is not None:
        return Access(offline=reason)
    return Access(unreachable=unreachable_reason(url))


def datasets_unavailable(named: bool = True) -> str | None:
    """Why a data set cannot be downloaded from the HF hub here, or None if it can.

    `named`: the user named a hub data set (`hf:<id>`). A task that only falls back to a
    hub copy (GLUE, E2E without `task.data_dir`) stays offline unless the user opts in
    with `HF_DATASETS_OFFLINE=0` (or `HF_HUB_OFFLINE=0`)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return "the `datasets` package is not installed"
    reason = offline_reason()
    if reason is None and offline_by_env("HF_DATASETS_OFFLINE") is not None:
        reason = "HF_DATASETS_OFFLINE=1 was given"
    if reason is not None:
        return f"offline because {reason}"
    if not named and not any(
        os.environ.get(var, "").strip().lower() in FALSE
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    ):
        return (
            "cotune keeps data sets offline unless the task names a hub data set "
            "(hf:<id>); set HF_DATASETS_OFFLINE=0 to download this one"
        )
    why = unreachable_reason()
    return None if why is None else f"the hub could not be reached: {why}"
