"""What produced a run: library versions and the git commit of the cotune checkout."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import cotune

PACKAGES = ("torch", "transformers", "peft", "flwr")


def versions() -> dict[str, str | None]:
    """python, cotune and the libraries that decide a run's numbers (None: not installed)."""
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "cotune": cotune.__version__,
    }
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@lru_cache(maxsize=1)
def git_commit() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout cotune runs from; None when cotune is not
    run from a checkout (an installed wheel) or git is not available."""
    source = Path(cotune.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())} if commit else None


def provenance() -> dict[str, Any]:
    """The `versions` and `git_commit` entries of summary.json."""
    git = git_commit()
    return {"versions": versions(), "git_commit": git["commit"] if git else None,
            "git_dirty": git["dirty"] if git else None}  # fmt: skip
