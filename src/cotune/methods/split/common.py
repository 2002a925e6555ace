"""What the device and the cloud of a split run must agree on, built the same way on both
sides: the model and its cut, the codec, the config fingerprint, private RNG streams,
and how token rows are packed for the wire."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from cotune.config import Config
from cotune.link.codecs import Codec, make_codec
from cotune.models import build_classifier
from cotune.models.cut import SplitClassifier, cut_classifier

PROTOCOL = "cotune-link/1"
DEVICE_STREAM, CLOUD_STREAM = 1, 2


def fingerprint(cfg: Config) -> str:
    """A hash of every setting both sides must share; a mismatch refuses the device."""
    shared = {
        "seed": cfg.seed,
        "model": cfg.model.model_dump(),
        "split": {"cut": cfg.split.cut, "labels": cfg.split.labels},
        "link": {"codec": cfg.link.codec, "rank": cfg.link.rank, "keep": cfg.link.keep},
        "train": {
            "lr": cfg.resolved_lr(),
            **cfg.train.model_dump(
                include={
                    "optimizer", "weight_decay", "warmup_ratio", "schedule",
                    "max_grad_norm", "precision", "label_smoothing",
                }
            ),
        },
    }  # fmt: skip
    blob = json.dumps(shared, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def build_split(cfg: Config, num_labels: int, problem: str) -> tuple[SplitClassifier, Codec]:
    """The full classifier built from the seed, cut as the config says (both sides)."""
    model, _, _ = build_classifier(
        cfg.model,
        num_labels,
        problem=problem,
        label_smoothing=cfg.train.label_smoothing,
        seed=cfg.seed,
    )
    codec = make_codec(cfg.link)
    split = cut_classifier(model, cfg.split.cut, labels=cfg.split.labels, sft_rank=codec.sft_rank)
    return split, codec


def trainable(modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# ----------------------------------------------------------------------------- RNG

_RNG_LOCK = threading.RLock()


class RngStream:
    """A private stream of torch's CPU RNG (dropout draws from the global generator).

    Each side of a split run consumes its own stream, swapped in around its forward
    passes, so dropout masks depend only on the seed and the side, not on what else the
    process does: in-process and over gRPC a run draws the same masks. Giving both
    sides one stream reproduces the unsplit model's masks (the forward order is the
    same), which the equivalence tests use.
    """

    def __init__(self, seed: int, stream: int) -> None:
        g = torch.Generator()
        g.manual_seed(seed * 1_000_003 + stream)
        self.state = g.get_state()

    @contextmanager
    def scope(self) -> Iterator[None]:
        with _RNG_LOCK:
            outer = torch.get_rng_state()
            torch.set_rng_state(self.state)
            try:
                yield
            finally:
                self.state = torch.get_rng_state()
                torch.set_rng_state(outer)


# ----------------------------------------------------------------------------- packing


def pack_rows(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, k] -> [N, k]: the rows of real tokens only (all rows without a mask)."""
    if mask is None:
        return hidden.reshape(-1, hidden.shape[-1])
    return hidden[mask.bool()]


def unpack_rows(
    rows: torch.Tensor, mask: torch.Tensor | None, batch: int, length: int
) -> torch.Tensor:
    """[N, k] -> [B, L, k] with zeros at padding (differentiable in `rows`)."""
    if mask is None:
        return rows.reshape(batch, length, rows.shape[-1])
    full = rows.new_zeros(batch, length, rows.shape[-1])
    return full.index_put((mask.bool(),), rows)
