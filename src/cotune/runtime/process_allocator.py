"""Start the cotune process on the allocator its config asks for.

A C allocator is chosen when a process starts, before its first allocation: for
`memory.allocator = "jemalloc"` the `cotune` command restarts itself (`os.execve`,
same arguments) with jemalloc's library in `LD_PRELOAD` and `MALLOC_CONF` returning
freed pages at once. Every process it then starts (devices, the cloud, seeds of a sweep)
inherits both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from cotune.config import Config
from cotune.errors import ConfigError
from cotune.memory.allocator import JEMALLOC_CONF, find_jemalloc, running_jemalloc

RESTARTED = "COTUNE_ALLOCATOR_RESTARTED"  # set on the restarted process: never loop


def jemalloc_env(library: str, env: Mapping[str, str]) -> dict[str, str]:
    """`env` with `library` preloaded first and jemalloc's page return made immediate
    (a `MALLOC_CONF` already in `env` is kept)."""
    out = dict(env)
    preload = [p for p in out.get("LD_PRELOAD", "").split(":") if p and p != library]
    out["LD_PRELOAD"] = ":".join([library, *preload])
    out.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    out[RESTARTED] = "1"
    return out


def ensure_process_allocator(cfg: Config, argv: Sequence[str] | None = None) -> None:
    """Return if this process already runs on `cfg.memory.allocator` (or the choice
    needs no restart); otherwise restart the command on it: this call does not return.

    Raises `ConfigError` when jemalloc is asked for but not installed, or when a
    restarted process still does not run on it."""
    if cfg.memory.allocator != "jemalloc" or running_jemalloc():
        return
    if sys.platform != "linux":
        raise ConfigError(
            'memory.allocator = "jemalloc" preloads the library, which cotune does on Linux '
            f'only (this is {sys.platform}); use memory.allocator = "release" or "default"'
        )
    if os.environ.get(RESTARTED):
        raise ConfigError(
            'memory.allocator = "jemalloc": the process restarted with LD_PRELOAD='
            f"{os.environ.get('LD_PRELOAD', '')} but does not run on jemalloc; check that "
            'the library loads (`ldd` it), or use memory.allocator = "release"'
        )
    library = find_jemalloc()
    if library is None:
        raise ConfigError(
            'memory.allocator = "jemalloc" needs jemalloc\'s library, not found on this '
            "machine: install it (Debian/Ubuntu: apt-get install libjemalloc2) or point "
            'COTUNE_JEMALLOC at libjemalloc.so.2; valid values: "release" (the default), '
            '"default", "jemalloc"'
        )
    args = [sys.executable, "-m", "cotune", *(sys.argv[1:] if argv is None else argv)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, jemalloc_env(library, os.environ))
