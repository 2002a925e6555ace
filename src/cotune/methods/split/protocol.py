"""What the device and the cloud of a split run must agree on, built the same way on both
sides: the protocol name, the config fingerprint, the model and its cut, the codec, the
RNG stream ids, and how the real tokens' rows are laid out on the wire."""

from __future__ import annotations

import hashlib
import json

import torch

from cotune.config import Config
from cotune.link.codecs import Codec, make_codec
from cotune.models import build_classifier
from cotune.models.cut import Party, SplitClassifier, cut_classifier, store_base
from cotune.models.span import build_span_model

PROTOCOL = "cotune-link/1"
DEVICE_STREAM, CLOUD_STREAM = 1, 2


def fingerprint(cfg: Config) -> str:
    """A hash of every setting both sides must share; a mismatch refuses the device."""
    shared = {
        "seed": cfg.seed,
        "model": cfg.model.model_dump(),
        "split": {"cut": cfg.split.cut, "labels": cfg.split.labels},
        "link": {
            "codec": cfg.link.codec,
            "rank": cfg.link.rank,
            "keep": cfg.link.keep,
            "code_format": cfg.link.code_format,
        },
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


def build_split(
    cfg: Config, num_labels: int, problem: str, party: Party = "all"
) -> tuple[SplitClassifier, Codec]:
    """The full model built from the seed, cut as the config says (both sides): a
    classifier, or a span extractor for `problem = "span"` (extractive QA). The frozen
    base goes to `model.base_dtype` after the cut, in the parts `party` keeps
    (`cotune.models.cut.store_base`)."""
    fp32 = cfg.model.model_copy(update={"base_dtype": "fp32"})
    if problem == "span":
        model, _, _ = build_span_model(fp32, seed=cfg.seed)
    else:
        model, _, _ = build_classifier(
            fp32,
            num_labels,
            problem=problem,
            label_smoothing=cfg.train.label_smoothing,
            seed=cfg.seed,
        )
    codec = make_codec(cfg.link)
    split = cut_classifier(model, cfg.split.cut, labels=cfg.split.labels, sft_rank=codec.sft_rank)
    store_base(split, cfg.model.base_dtype, party)
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


# ----------------------------------------------------------------------------- packing


def real_token_rows(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, k] -> [N, k]: the rows of real tokens only (all rows without a mask)."""
    if mask is None:
        return hidden.reshape(-1, hidden.shape[-1])
    return hidden[mask.bool()]


def scatter_rows(
    rows: torch.Tensor, mask: torch.Tensor | None, batch: int, length: int
) -> torch.Tensor:
    """[N, k] -> [B, L, k] with zeros at padding (differentiable in `rows`)."""
    if mask is None:
        return rows.reshape(batch, length, rows.shape[-1])
    full = rows.new_zeros(batch, length, rows.shape[-1])
    return full.index_put((mask.bool(),), rows)
