"""The server's state after a completed round, written atomically to RUN_DIR/checkpoint.

It holds everything the next round depends on: the round number, the global trainable
state, the server hook's state (fedkd's teacher), and the running totals (bytes, wall
time, peak memory). Client sampling, client seeds and server-side training seeds are
derived from (seed, round), so nothing else is needed to continue exactly.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file, save_file

from cotune.export.state import TRAINABLE_FILE
from cotune.methods.spec import State

CHECKPOINT_DIR = "checkpoint"


@dataclass
class ServerCheckpoint:
    round: int
    global_state: State
    hook_state: State = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def _save_state(state: State, path: Path) -> None:
    # safetensors keeps names; key order is restored from the JSON index.
    save_file({k: v for k, v in state.items()}, str(path))


def save_checkpoint(run_dir: str | Path, ckpt: ServerCheckpoint) -> Path:
    """Write `ckpt`, replacing the previous checkpoint only once the new one is complete."""
    final = checkpoint_dir(run_dir)
    tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
    old = final.with_name(CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_state(ckpt.global_state, tmp / "global.safetensors")
    _save_state(ckpt.hook_state, tmp / "hook.safetensors")
    meta = {
        "round": ckpt.round,
        "global_keys": list(ckpt.global_state),
        "hook_keys": list(ckpt.hook_state),
        "totals": ckpt.totals,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _state_file(run_dir: str | Path) -> Path | None:
    """The last complete checkpoint's state.json (the previous one when a swap was
    interrupted), or None."""
    path = checkpoint_dir(run_dir) / "state.json"
    if path.exists():
        return path
    old = checkpoint_dir(run_dir).with_name(CHECKPOINT_DIR + ".old") / "state.json"
    return old if old.exists() else None


def checkpoint_round(run_dir: str | Path) -> int | None:
    """The round the run folder's checkpoint completed (read from its index only), or
    None when it has no checkpoint."""
    state = _state_file(run_dir)
    if state is None:
        return None
    done = json.loads(state.read_text()).get("round")  # a local run's checkpoint has none
    return None if done is None else int(done)


def load_checkpoint(run_dir: str | Path) -> ServerCheckpoint | None:
    """The last completed round's checkpoint, or None if the run has none."""
    state = _state_file(run_dir)
    if state is None:
        return None
    path = state.parent
    meta = json.loads((path / "state.json").read_text())
    glob = load_file(str(path / "global.safetensors"))
    hook = load_file(str(path / "hook.safetensors"))
    return ServerCheckpoint(
        round=int(meta["round"]),
        global_state={k: glob[k] for k in meta["global_keys"]},
        hook_state={k: hook[k] for k in meta["hook_keys"]},
        totals=dict(meta.get("totals", {})),
    )


def save_final_state(run_dir: str | Path, state: State) -> Path:
    """The final global model's trainable tensors, as RUN_DIR/trainable.safetensors
    (what `cotune.export` reads), whatever `runtime.checkpoint` says."""
    path = Path(run_dir) / TRAINABLE_FILE
    tmp = path.with_name(path.name + ".tmp")
    _save_state(state, tmp)
    tmp.replace(path)
    return path
