"""A span extractor for extractive QA: an HF base model + a linear head giving each
token a start and an end logit (as `BertForQuestionAnswering`, on any family of the
zoo), with LoRA and the base dtype handled as for the classifier.

It is a `SequenceClassifier` with two outputs that skips pooling, so the backbone,
the `head` (what LoRA keeps trainable) and the token-type handling are the
classifier's own. `span` (dropout, head, loss on per-token hidden states) is exposed
separately so that a cut model (`cotune.models.cut`) runs the same head on the cloud's
(or, U-shaped, the device's) side.

The loss leaves padding out: a padded position can be neither the start nor the end
(its logits do not enter the softmax), so the loss depends on the real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cotune.config.schema import ModelConfig
from cotune.errors import ModelError
from cotune.models.base_dtype import apply_base_dtype
from cotune.models.classifier import SequenceClassifier
from cotune.models.zoo import (
    IMAGE_FAMILIES,
    ModelSource,
    load_backbone,
    load_tokenizer,
    resolve,
)


@dataclass
class SpanOutput:
    loss: Tensor | None
    start_logits: Tensor  # (batch, tokens)
    end_logits: Tensor


def span_loss(
    start_logits: Tensor, end_logits: Tensor, labels: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Mean of the start and end cross-entropies; `labels` is (batch, 2) token positions.
    With a padding `mask` (batch, tokens; 0 at padding) padded positions are left out
    of both softmaxes."""

    def logits(x: Tensor) -> Tensor:
        x = x.float()
        if mask is None:
            return x
        return x.masked_fill(~mask.bool(), torch.finfo(x.dtype).min)

    start = nn.functional.cross_entropy(logits(start_logits), labels[:, 0].long())
    end = nn.functional.cross_entropy(logits(end_logits), labels[:, 1].long())
    return (start + end) / 2


class _SpanHead(Protocol):
    """What `span` reads (the split head segment borrows the method)."""

    @property
    def dropout(self) -> nn.Module: ...
    @property
    def head(self) -> nn.Module: ...


class SpanExtractor(SequenceClassifier):
    """`backbone` -> `dropout` -> `head` (hidden -> 2) on every token: start and end
    logits; the loss is `span_loss` when labels are given."""

    def span(
        self: _SpanHead, hidden: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> SpanOutput:
        """Dropout + head on hidden states (batch, tokens, hidden), and the loss (padding
        left out by `mask`) when labels are given."""
        logits = self.head(self.dropout(hidden))
        start, end = logits[..., 0], logits[..., 1]
        loss = None if labels is None else span_loss(start, end, labels, mask)
        return SpanOutput(loss=loss, start_logits=start, end_logits=end)

    def forward(  # type: ignore[override]
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> SpanOutput:
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        return self.span(hidden, labels, attention_mask)


def build_span_model(
    model_cfg: ModelConfig, *, seed: int = 0
) -> tuple[nn.Module, Any, ModelSource]:
    """(model, tokenizer, source) for `model_cfg`: a SpanExtractor, wrapped by peft when
    `model_cfg.lora` is set (the head trains in full), its frozen base stored in
    `model_cfg.base_dtype`, in eval mode. Tiny backbones and the head are initialised
    from `seed`."""
    source = resolve(model_cfg.name)
    if source.family in IMAGE_FAMILIES:
        raise ModelError(f"model {model_cfg.name!r} is an image model; extractive QA needs text")
    backbone = load_backbone(model_cfg.name, seed=seed)
    tokenizer = load_tokenizer(model_cfg.name)
    dropout = getattr(backbone.config, "hidden_dropout_prob", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SpanExtractor(
            backbone, 2, family=source.family, pooling="cls",
            dropout=0.1 if dropout is None else float(dropout),
        )  # fmt: skip
        std = getattr(backbone.config, "initializer_range", 0.02)
        nn.init.normal_(model.head.weight, mean=0.0, std=std)
        nn.init.zeros_(model.head.bias)
    model.eval()
    if model_cfg.lora is not None:
        from cotune.models.lora import apply_lora

        wrapped = apply_lora(model, model_cfg.lora, source.family)
        return apply_base_dtype(wrapped, model_cfg.base_dtype), tokenizer, source
    return apply_base_dtype(model, model_cfg.base_dtype), tokenizer, source
