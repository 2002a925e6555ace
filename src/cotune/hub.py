"""Whether the Hugging Face hub can be used from this process (for models and data that
are not packaged). cotune runs offline unless the user allows the hub; when allowed, a
3-second probe avoids huggingface_hub retrying a dead network for ~30 s."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

TRUE = ("1", "true", "yes", "on")


def offline_by_env(*variables: str) -> str | None:
    """The first of `variables` (default HF_HUB_OFFLINE) set to a true value, or None."""
    for var in variables or ("HF_HUB_OFFLINE",):
        if os.environ.get(var, "").strip().lower() in TRUE:
            return var
    return None


@lru_cache(maxsize=4)
def reachable(endpoint: str = "https://huggingface.co") -> bool:
    """Whether `endpoint` accepts a TCP connection within 3 s (checked once per process)."""
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def datasets_unavailable() -> str | None:
    """Why a data set cannot be downloaded from the HF hub here, or None if it can."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return "the `datasets` package is not installed"
    var = offline_by_env("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if var is not None:
        return f"{var} is set"
    if not reachable():
        return "huggingface.co cannot be reached"
    return None
