"""fedpft on a device: keep the proxy the cloud sent in a store (a folder,
content-addressed), train LoRA on the proxy's attention projections plus the head on
local data, and return the adapter under the FM's tensor names (and the neuron
statistics when the cloud asks for them)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cotune.config import Config
from cotune.memory import apply_memory_option
from cotune.methods.federated.client import (
    check_partition,
    client_adapter,
    partition_data,
    round_metrics,
    train_round,
)
from cotune.methods.federated.state import get_state, set_state
from cotune.methods.fedpft.alignment import NeuronStats
from cotune.methods.fedpft.cloud import META_KEY, PROXY_KEY, STATS_KEY
from cotune.methods.spec import ClientUpdate, State
from cotune.models.proxy import (
    ProxyPlan,
    load_proxy_weights,
    plan_proxy,
    proxy_skeleton,
    to_fm_names,
    to_proxy_names,
)
from cotune.training import set_threads
from cotune.training.tasks import Encoded


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


class DeviceStore:
    """A device's copy of the proxy: tensors stored by content hash in a folder, and a
    manifest (version, name -> hash). Devices sharing a machine (simulation) share the
    content-addressed blobs, never each other's manifests."""

    def __init__(self, root: Path, device: int) -> None:
        self.blobs = root / "blobs"
        self.manifest_path = root / f"device-{device}.json"

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"version": 0, "tensors": {}}
        return json.loads(self.manifest_path.read_text())

    def update(self, version: int, tensors: State) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        man = self.manifest()
        for name, arr in tensors.items():
            digest = _digest(arr)
            blob = self.blobs / f"{digest}.npy"
            if not blob.exists():
                tmp = blob.with_suffix(f".{id(arr)}.tmp")
                with tmp.open("wb") as f:
                    np.save(f, np.ascontiguousarray(arr))
                tmp.replace(blob)
            man["tensors"][name] = digest
        man["version"] = version
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(man))
        tmp.replace(self.manifest_path)

    def load(self) -> tuple[int, dict[str, Tensor]]:
        man = self.manifest()
        return int(man["version"]), {
            n: torch.from_numpy(np.load(self.blobs / f"{d}.npy")) for n, d in man["tensors"].items()
        }


def device_store_root(cfg: Config) -> Path:
    key = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "cotune-devices" / key


@lru_cache(maxsize=2)
def _proxy_model(cfg_json: str) -> tuple[nn.Module, Any, ProxyPlan]:
    """The proxy's skeleton (shapes from the config); every frozen tensor is overwritten by
    the proxy weights the cloud sent before each use."""
    cfg = Config.model_validate_json(cfg_json)
    model, tokenizer = client_adapter(cfg).build_model()
    plan = plan_proxy(model, cfg.proxy)
    model = proxy_skeleton(model, plan)
    apply_memory_option(model, cfg.memory)
    return model, tokenizer, plan


@lru_cache(maxsize=4)
def _proxy_data(cfg_json: str, partition_id: int) -> Encoded:
    cfg = Config.model_validate_json(cfg_json)
    return partition_data(cfg, partition_id, _proxy_model(cfg_json)[1])


def proxy_local_train(
    cfg: Config,
    partition_id: int,
    global_state: State,
    server_round: int,
    extras: dict[str, State] | None = None,
) -> ClientUpdate:
    """One round on the device: refresh the stored proxy, train LoRA + head on local data."""
    check_partition(cfg, partition_id)
    extras = extras or {}
    if META_KEY not in extras:
        raise ValueError("a fedpft train message must carry the proxy-meta record")
    version = int(extras[META_KEY]["version"][0])
    want_stats = bool(extras[META_KEY]["stats"][0])
    key = cfg.model_dump_json()
    set_threads(cfg.train)
    model, tokenizer, plan = _proxy_model(key)
    data = _proxy_data(key, partition_id)
    store = DeviceStore(device_store_root(cfg), partition_id)
    if PROXY_KEY in extras:
        store.update(version, extras[PROXY_KEY])
    held, weights = store.load()
    if held != version:
        raise RuntimeError(
            f"device {partition_id} holds proxy version {held}, the cloud trains version {version}"
        )
    load_proxy_weights(model, weights)
    set_state(model, to_proxy_names(global_state, plan))
    recorder = NeuronStats(model, plan)
    with recorder.attached() if want_stats else nullcontext():
        stats = train_round(cfg, model, tokenizer, data, partition_id, server_round)
    state = {**global_state, **to_fm_names(get_state(model), plan)}  # dropped layers: unchanged
    out_extras: dict[str, State] = {}
    if want_stats:
        out_extras[STATS_KEY] = {
            f"layer.{j}": u.numpy().astype(np.float32) for j, u in recorder.means().items()
        }
    return ClientUpdate(
        state={k: state[k] for k in global_state},
        num_examples=len(data),
        metrics={**round_metrics(stats), "proxy_version": float(version)},
        extras=out_extras,
    )
