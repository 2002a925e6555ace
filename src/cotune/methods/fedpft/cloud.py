"""fedpft on the cloud: the proxy hook.

1. builds the proxy from the full model (FM) the server holds (`cotune.models.proxy`),
   and aligns it layer by layer on public data (`proxy.public_corpus`, a task whose
   examples are of the clients' kind: by default bbc-news article text for text tasks,
   scikit-learn's handwritten digits for image tasks; clients train on the task's
   data, never on it), encoded by that task's own adapter;
2. sends each sampled device the proxy weights it does not hold yet (all of them the
   first time, afterwards only the tensors re-aligned since its last round), inside
   its train message, so they are counted with the round's bytes;
3. every `proxy.align_every` rounds asks the devices for per-neuron activation
   statistics, averages them (weighted by examples) and re-aligns the least-used
   `1 - proxy.align_keep` of each compressed layer's neurons against the FM carrying
   the current aggregated adapter;
4. the aggregated adapter and head are plugged into the FM, which the server evaluates
   every round (the global model of the federated run *is* the FM with LoRA).
The FM's own weights never go into a message: only the proxy's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from cotune.config import Config
from cotune.config.schema import TaskConfig
from cotune.data import Example, load_task
from cotune.methods.federated.global_model import GlobalModel
from cotune.methods.federated.state import set_state
from cotune.methods.fedpft.alignment import AlignStats, align, layer_gaps, least_used, neuron_masks
from cotune.methods.spec import ServerHook, State
from cotune.models.proxy import (
    build_proxy,
    ffn_param_names,
    non_embedding_params,
    proxy_weights,
    to_proxy_names,
)
from cotune.training import (
    TaskAdapter,
    adapter_for,
    cycle,
    derive_seed,
    model_inputs,
    seed_everything,
)
from cotune.training.tasks import Encoded

PROXY_KEY = "proxy"  # ArrayRecord (down): proxy tensors the device does not hold yet
META_KEY = "proxy-meta"  # ArrayRecord (down): version, whether to report statistics
STATS_KEY = "neuron-stats"  # ArrayRecord (up): mean |activation| per neuron, per layer
GAP_BATCHES = 4  # held-out public batches on which layer gaps are measured


# ----------------------------------------------------------------------------- public data


class PublicData:
    """The cloud's public data (`proxy.public_corpus`, checked and filled in by fedpft's
    `configure`): its training examples to align on and its held-out ones to measure
    layer gaps on, labels dropped, encoded for the FM by the public task's own adapter
    (text: tokenised to `train.max_seq_len`; images: resized to `task.image_size`)."""

    def __init__(self, cfg: Config, tokenizer: Any) -> None:
        assert cfg.proxy.public_corpus is not None, "fedpft's configure fills it in"
        self.cfg = cfg
        self.tokenizer = tokenizer
        task = load_task(TaskConfig(name=cfg.proxy.public_corpus), cfg.seed)
        self.adapter: TaskAdapter = adapter_for(task, cfg)
        held_out = next(iter(task.eval.values()), []) or task.train
        self.train: Encoded = self.adapter.encode(_unlabelled(task.train), tokenizer)
        self.held_out: Encoded = self.adapter.encode(_unlabelled(held_out), tokenizer)

    def batches(self, ds: Encoded, seed: int) -> Iterator[dict]:
        """Model inputs (no labels) of `ds`, in a seeded order, cycled."""
        loader = self.adapter.loader(ds, self.tokenizer, shuffle=True, seed=seed)
        return (model_inputs(b) for b in cycle(loader))


def _unlabelled(examples: list[Example]) -> list[Example]:
    return [dataclasses.replace(ex, label=0) for ex in examples]


# ----------------------------------------------------------------------------- cloud


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


class ProxyHook(ServerHook):
    """The cloud side of fedpft (see the module docstring)."""

    def __init__(self, cfg: Config, global_model: GlobalModel) -> None:
        self.cfg = cfg
        self.fm = global_model.model
        self.tokenizer = global_model.tokenizer
        self.proxy, self.plan, self.neurons = build_proxy(self.fm, cfg.proxy)
        self.align_names = ffn_param_names(self.proxy, self.plan)
        self.public = PublicData(cfg, self.tokenizer)
        gap_iter = self.public.batches(self.public.held_out, derive_seed(cfg.seed, "gap"))
        self.gap_batches = [next(gap_iter) for _ in range(GAP_BATCHES)]
        self.info: dict[str, Any] = {
            "proxy_kind": self.plan.kind,
            "proxy_layers": list(self.plan.layer_map),
            "proxy_ffn": list(self.plan.ffn_keep),
            "fm_non_embedding_params": non_embedding_params(self.fm),
            "proxy_non_embedding_params": non_embedding_params(self.proxy),
            "fm_params": sum(p.numel() for p in self.fm.parameters()),
            "proxy_params": sum(p.numel() for p in self.proxy.parameters()),
        }
        if not _load_aligned(self):
            self.info["gap_before"] = self.gaps()
            stats = self._align_before_fl()
            self.info["gap_after"] = self.gaps()
            self.info["align_first_loss"] = stats.first_loss
            self.info["align_last_loss"] = stats.last_loss
            _save_aligned(self)
        self.version = 1
        names = list(proxy_weights(self.proxy))
        self.changed_at: dict[str, int] = dict.fromkeys(names, 1)
        self.held: dict[int, int] = {}  # partition -> proxy version it holds
        self._sent: dict[int, int] = {}  # partition -> version sent this round
        self._usage: dict[int, Tensor] = {}
        self._usage_weight = 0.0
        self._metrics: dict[str, float] = {}
        self._first_round_logged = False

    def device_model(self) -> torch.nn.Module:
        """Devices hold the proxy, not the FM."""
        return self.proxy

    def summary(self) -> dict[str, float]:
        """Proxy size and its layer gaps to the FM before / after layer-level alignment."""
        gb, ga = self.info["gap_before"], self.info["gap_after"]
        out = {
            "proxy_gap_before": float(np.mean(gb)),
            "proxy_gap_after": float(np.mean(ga)),
            "proxy_non_embedding_params": float(self.info["proxy_non_embedding_params"]),
            "fm_non_embedding_params": float(self.info["fm_non_embedding_params"]),
            "proxy_params": float(self.info["proxy_params"]),
            "fm_params": float(self.info["fm_params"]),
        }
        for j, (b, a) in enumerate(zip(gb, ga, strict=True)):
            out[f"proxy_gap_before_l{j}"] = float(b)
            out[f"proxy_gap_after_l{j}"] = float(a)
        return out

    # -- alignment
    def gaps(self) -> list[float]:
        """Per proxy layer: normalised MSE to the FM's matching layer (held-out public data)."""
        return layer_gaps(self.proxy, self.fm, self.plan, self.gap_batches)

    def _align_before_fl(self) -> AlignStats:
        cfg = self.cfg
        seed_everything(derive_seed(cfg.seed, "proxy/align"))
        batches = self.public.batches(self.public.train, derive_seed(cfg.seed, "proxy/align"))
        return align(self.proxy, self.fm, self.plan, batches, cfg.proxy.align_steps,
                     cfg.proxy.align_lr, params=self.align_names)  # fmt: skip

    def wants_stats(self, server_round: int) -> bool:
        """Whether this round ends with neuron-level alignment (never after the last
        round: nothing would train on the re-aligned proxy)."""
        p = self.cfg.proxy
        return (
            self.plan.kind == "neuron"
            and p.realign_steps > 0
            and p.align_keep < 1
            and server_round % p.align_every == 0
            and server_round < self.cfg.federated.rounds
        )

    # -- messages
    def extras_for(self, partition: int, server_round: int) -> dict[str, State]:
        """The proxy tensors `partition` lacks, and this round's proxy version and requests."""
        held = self.held.get(partition, 0)
        weights = proxy_weights(self.proxy)
        send = {n: _np(w) for n, w in weights.items() if self.changed_at[n] > held}
        self._sent[partition] = self.version
        meta = {
            "version": np.array([self.version], dtype=np.int64),
            "stats": np.array([int(self.wants_stats(server_round))], dtype=np.int64),
        }
        return {PROXY_KEY: send, META_KEY: meta} if send else {META_KEY: meta}

    def observe_reply(
        self, server_round: int, partition: int, extras: dict[str, State], weight: float,
        accepted: bool,
    ) -> None:  # fmt: skip
        if partition in self._sent:
            self.held[partition] = self._sent[partition]  # the device stored what it got
        if accepted and STATS_KEY in extras and weight > 0:
            for key, usage in extras[STATS_KEY].items():
                j = int(key.rsplit(".", 1)[-1])
                u = torch.from_numpy(np.asarray(usage, dtype=np.float64)) * weight
                self._usage[j] = self._usage.get(j, torch.zeros_like(u)) + u
            self._usage_weight += weight

    def after_aggregate(self, server_round: int, state: State) -> State:
        self._sent.clear()
        self._metrics = {}
        if not self._first_round_logged:
            self._first_round_logged = True
            self._metrics.update(self.summary())
        if self._usage and self.wants_stats(server_round):
            self._metrics.update(self._realign(server_round, state))
        self._usage, self._usage_weight = {}, 0.0
        return state

    def _realign(self, server_round: int, state: State) -> dict[str, float]:
        """Neuron-level alignment against the FM carrying the aggregated adapter."""
        cfg = self.cfg
        set_state(self.fm, state)
        set_state(self.proxy, to_proxy_names(state, self.plan))
        usage = {j: u / self._usage_weight for j, u in self._usage.items()}
        realign = least_used(usage, cfg.proxy.align_keep)
        names, masks = neuron_masks(self.proxy, self.plan, realign)
        before = self.gaps()
        seed = derive_seed(cfg.seed, "proxy/realign", server_round)
        seed_everything(seed)
        stats = align(self.proxy, self.fm, self.plan, self.public.batches(self.public.train, seed),
                      cfg.proxy.realign_steps, cfg.proxy.align_lr, params=names,
                      grad_masks=masks)  # fmt: skip
        after = self.gaps()
        self.version += 1
        for n in names:
            self.changed_at[n] = self.version
        return {
            "realign_neurons": float(sum(len(v) for v in realign.values())),
            "realign_gap_before": float(np.mean(before)),
            "realign_gap_after": float(np.mean(after)),
            "realign_loss_first": stats.first_loss,
            "realign_loss_last": stats.last_loss,
            "proxy_version": float(self.version),
        }

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # -- checkpoint: the aligned tensors and who holds which version
    def state_dict(self) -> State:
        named = dict(self.proxy.named_parameters())
        out: State = {f"proxy/{n}": _np(named[n]) for n in self.align_names}
        names = sorted(self.changed_at)
        out["meta/changed_at"] = np.array([self.changed_at[n] for n in names], dtype=np.int64)
        parts = sorted(self.held)
        out["meta/held"] = np.array([[p, self.held[p]] for p in parts], dtype=np.int64).reshape(
            -1, 2
        )
        out["meta/version"] = np.array([self.version], dtype=np.int64)
        return out

    def load_state_dict(self, state: State) -> None:
        if not state:
            return
        named = dict(self.proxy.named_parameters())
        with torch.no_grad():
            for n in self.align_names:
                named[n].copy_(torch.from_numpy(np.asarray(state[f"proxy/{n}"])))
        names = sorted(self.changed_at)
        self.changed_at = {n: int(v) for n, v in zip(names, state["meta/changed_at"], strict=True)}
        self.held = {int(p): int(v) for p, v in np.asarray(state["meta/held"]).reshape(-1, 2)}
        self.version = int(state["meta/version"][0])
        self._first_round_logged = True

    @property
    def trainable(self) -> int:
        named = dict(self.proxy.named_parameters())
        return sum(named[n].numel() for n in self.align_names)


def _cache_path(hook: ProxyHook) -> Path | None:
    """Where a pre-aligned proxy is cached (env COTUNE_PROXY_CACHE; unset: no cache).

    The key covers everything layer-level alignment depends on, so runs that differ
    only in federated settings (partition, neuron-level alignment) reuse the result.
    """
    root = os.environ.get("COTUNE_PROXY_CACHE")
    if not root:
        return None
    cfg = hook.cfg
    p = cfg.proxy
    key = json.dumps(
        [cfg.seed, cfg.model.model_dump(), cfg.task.name, cfg.train.max_seq_len,
         cfg.train.batch_size, p.kind, p.keep_layers, p.ffn_keep, p.align_steps, p.align_lr,
         p.public_corpus, cfg.task.image_size],
        sort_keys=True,
    )  # fmt: skip
    return Path(root) / f"proxy-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"


def _load_aligned(hook: ProxyHook) -> bool:
    path = _cache_path(hook)
    if path is None or not path.exists():
        return False
    tensors = load_file(str(path))
    named = dict(hook.proxy.named_parameters())
    with torch.no_grad():
        for n in hook.align_names:
            named[n].copy_(tensors[n])
    hook.info.update(json.loads(path.with_suffix(".json").read_text()))
    return True


def _save_aligned(hook: ProxyHook) -> None:
    path = _cache_path(hook)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    named = dict(hook.proxy.named_parameters())
    save_file({n: named[n].detach().contiguous() for n in hook.align_names}, str(path))
    keys = ("gap_before", "gap_after", "align_first_loss", "align_last_loss")
    path.with_suffix(".json").write_text(json.dumps({k: hook.info[k] for k in keys}))
