"""The server's state after a completed round, written atomically to RUN_DIR/checkpoint.

It holds everything the next round depends on: the round number, the global trainable
state, the server hook's state (fedkd's teacher), and the running totals (bytes, wall
time, peak memory). Client sampling, client seeds and server-side training seeds are
derived from (seed, round), so nothing else is needed to continue exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file, save_file

from cotune.export.state import TRAINABLE_FILE
from cotune.methods.spec import State
from cotune.training.resume import state_file, write_checkpoint_dir


@dataclass
class ServerCheckpoint:
    round: int
    global_state: State
    hook_state: State = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)


def _save_state(state: State, path: Path) -> None:
    # safetensors keeps names; key order is restored from the JSON index.
    save_file({k: v for k, v in state.items()}, str(path))


def save_checkpoint(run_dir: str | Path, ckpt: ServerCheckpoint) -> Path:
    """Write `ckpt`, replacing the previous checkpoint only once the new one is complete."""

    def write(folder: Path) -> None:
        _save_state(ckpt.global_state, folder / "global.safetensors")
        _save_state(ckpt.hook_state, folder / "hook.safetensors")
        meta = {
            "round": ckpt.round,
            "global_keys": list(ckpt.global_state),
            "hook_keys": list(ckpt.hook_state),
            "totals": ckpt.totals,
        }
        (folder / "state.json").write_text(json.dumps(meta, indent=2) + "\n")

    return write_checkpoint_dir(run_dir, write)


def checkpoint_round(run_dir: str | Path) -> int | None:
    """The round the run folder's checkpoint completed (read from its index only), or
    None when it has no checkpoint."""
    state = state_file(run_dir)
    if state is None:
        return None
    done = json.loads(state.read_text()).get("round")  # a local run's checkpoint has none
    return None if done is None else int(done)


def load_checkpoint(run_dir: str | Path) -> ServerCheckpoint | None:
    """The last completed round's checkpoint, or None if the run has none."""
    state = state_file(run_dir)
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
