"""What a finished run saved of its model, read back from its run folder.

Every method saves the tensors it trained under the names of the uncut model it was
built as (`MethodResult.saved`, written by the runtime):

| run | files |
|---|---|
| centralized; federated (the final global model) | `trainable.safetensors` |
| federated runs made before that file existed | `checkpoint/global.safetensors` (the last completed round; only with `runtime.checkpoint`) |
| split, splitfed | `device_trainable.safetensors` + `cloud_trainable.safetensors` (or `cloud/cloud_trainable.safetensors`, written by a loopback `cotune cloud`) |

Under LoRA these are the adapters and the head; under full fine-tuning every weight.
A split run with the `sft` codec also saved the cut layer's trained SVD factors, as
`<layer>.sft.<V|S|U|bias>` (`cotune.models.cut`), which `fold_sft` turns back into
the dense matrix they factorise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from cotune.errors import ExportError

TRAINABLE_FILE = "trainable.safetensors"
DEVICE_FILE = "device_trainable.safetensors"
CLOUD_FILE = "cloud_trainable.safetensors"
LOOPBACK_CLOUD_FILE = "cloud/cloud_trainable.safetensors"
CHECKPOINT_FILE = "checkpoint/global.safetensors"
CHECKPOINT_META = "checkpoint/state.json"
SFT_PARTS = ("V", "S", "U", "bias")


@dataclass
class TrainedState:
    """The trained tensors of a run (by the uncut model's parameter names), the files
    they came from, and notes on them (e.g. the round of a checkpoint)."""

    tensors: dict[str, Tensor]
    files: list[str]
    notes: list[str] = field(default_factory=list)
    # a split run's device half without its cloud half (a device of a remote cloud)
    cloud_missing: bool = False


def _load(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ExportError(f"{path} is not a readable safetensors file: {err}") from None


def read_trained_state(run_dir: Path) -> TrainedState:
    """The trained tensors `run_dir` holds (see the module doc); ExportError if none."""
    device = run_dir / DEVICE_FILE
    if device.is_file():
        tensors = _load(device)
        files = [DEVICE_FILE]
        for name in (CLOUD_FILE, LOOPBACK_CLOUD_FILE):
            if (run_dir / name).is_file():
                tensors.update(_load(run_dir / name))
                files.append(name)
                return TrainedState(tensors, files)
        return TrainedState(tensors, files, cloud_missing=True)
    if (run_dir / TRAINABLE_FILE).is_file():
        return TrainedState(_load(run_dir / TRAINABLE_FILE), [TRAINABLE_FILE])
    if (run_dir / CHECKPOINT_FILE).is_file():
        notes = []
        meta = run_dir / CHECKPOINT_META
        if meta.is_file():
            completed = json.loads(meta.read_text()).get("round")
            notes.append(f"the global model after round {completed} (the run's last checkpoint)")
        return TrainedState(_load(run_dir / CHECKPOINT_FILE), [CHECKPOINT_FILE], notes)
    raise ExportError(
        f"run folder {run_dir} holds no saved weights (none of {TRAINABLE_FILE}, {DEVICE_FILE}, "
        f"{CHECKPOINT_FILE}): a run saves them when it finishes, so it was interrupted, or "
        "is a federated run made before cotune saved the final global model and without "
        "runtime.checkpoint; run it again"
    )


def pop_sft_factors(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Remove the SFT factors from `tensors`; returns them by layer name
    (`{"backbone.encoder.layer.2": {"V": ..., "S": ..., "U": ..., "bias": ...}}`)."""
    out: dict[str, dict[str, Tensor]] = {}
    for name in [n for n in tensors if ".sft." in n]:
        layer, part = name.rsplit(".sft.", 1)
        if part not in SFT_PARTS:
            continue
        out.setdefault(layer, {})[part] = tensors.pop(name)
    for layer, parts in out.items():
        lacking = [p for p in ("V", "S", "U") if p not in parts]
        if lacking:
            raise ExportError(
                f"the SFT factors of {layer} lack {', '.join(lacking)}: the saved state is "
                "incomplete (were the device's and the cloud's halves saved by the same run?)"
            )
    return out
