"""A sequence (or image) classifier: an unmodified HF base model + pooling + a linear head.

The pieces are exposed separately (`encode`, `pool`, `classify`) so that a model cut
into device and cloud segments can run the backbone in parts and reuse the pooling and
the head unchanged.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from cotune.config.schema import ModelConfig
from cotune.errors import ModelError
from cotune.models.base_dtype import apply_base_dtype
from cotune.models.zoo import (
    DECODER_FAMILIES,
    IMAGE_FAMILIES,
    Family,
    ModelSource,
    load_backbone,
    load_tokenizer,
    resolve,
)

Pooling = Literal["mean", "cls", "last"]
Problem = Literal["classification", "regression"]
POOLINGS: tuple[str, ...] = ("mean", "cls", "last")
PROBLEMS: tuple[str, ...] = ("classification", "regression")


def takes_token_type_ids(backbone: nn.Module) -> bool:
    """Whether `backbone` gets token_type_ids: its forward takes them and its config has
    more than one token type (BERT, RoBERTa and e.g. a generic ELECTRA; not DistilBERT,
    decoders, or DeBERTa-v2, whose type_vocab_size is 0)."""
    config = getattr(backbone, "config", None)
    if (getattr(config, "type_vocab_size", 0) or 0) <= 1:
        return False
    return "token_type_ids" in inspect.signature(backbone.forward).parameters


@dataclass
class ClassifierOutput:
    loss: Tensor | None
    logits: Tensor


def mean_pool(hidden_states: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Average of the hidden states of real (mask 1) tokens, as sentence-transformers does."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    summed = (hidden_states * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def last_token_pool(hidden_states: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Hidden state of the last real token (works for left and right padding)."""
    if attention_mask is None:
        return hidden_states[:, -1]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * (attention_mask > 0)).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


class _Pools(Protocol):
    """What `SequenceClassifier.pool` reads (the split cloud segment borrows the method)."""

    @property
    def pooling(self) -> str: ...


class _Classifies(Protocol):
    """What `classify` and `loss` read (the split head segment borrows both methods)."""

    @property
    def dropout(self) -> nn.Module: ...
    @property
    def head(self) -> nn.Module: ...
    @property
    def problem(self) -> str: ...
    @property
    def label_smoothing(self) -> float: ...
    def loss(self, logits: Tensor, labels: Tensor) -> Tensor: ...


class SequenceClassifier(nn.Module):
    """`backbone` (an HF base model) -> `pool` -> `dropout` -> `head`.

    Text models take `input_ids` / `attention_mask` (/ `token_type_ids`); ViT and DINOv2
    take `pixel_values`. With `num_labels == 1` the problem is regression (MSE on the single
    logit); otherwise classification (cross-entropy with `label_smoothing`).
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        num_labels: int,
        *,
        family: Family,
        pooling: Pooling,
        dropout: float = 0.1,
        problem: Problem = "classification",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"pooling {pooling!r} is not valid; valid: {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.family = family
        self.pooling = pooling
        self.num_labels = num_labels
        self.problem = problem
        self.label_smoothing = label_smoothing
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)
        self.uses_token_type_ids = takes_token_type_ids(backbone)

    def encode(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
    ) -> Tensor:
        """The backbone's last hidden states, (batch, tokens, hidden)."""
        if pixel_values is not None:
            return self.backbone(pixel_values=pixel_values).last_hidden_state
        if input_ids is None:
            raise ModelError("the classifier needs input_ids (text) or pixel_values (images)")
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.uses_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        return self.backbone(**kwargs).last_hidden_state

    def pool(self: _Pools, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(batch, tokens, hidden) -> (batch, hidden) by this model's pooling."""
        if self.pooling == "mean":
            return mean_pool(hidden_states, attention_mask)
        if self.pooling == "last":
            return last_token_pool(hidden_states, attention_mask)
        return hidden_states[:, 0]

    def classify(
        self: _Classifies, pooled: Tensor, labels: Tensor | None = None
    ) -> ClassifierOutput:
        """Dropout + head on pooled features, and the loss when labels are given."""
        logits = self.head(self.dropout(pooled))
        loss = None if labels is None else self.loss(logits, labels)
        return ClassifierOutput(loss=loss, logits=logits)

    def loss(self: _Classifies, logits: Tensor, labels: Tensor) -> Tensor:
        if self.problem == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return nn.functional.cross_entropy(
            logits.float(), labels.long(), label_smoothing=self.label_smoothing
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        pixel_values: Tensor | None = None,
    ) -> ClassifierOutput:
        hidden = self.encode(input_ids, attention_mask, token_type_ids, pixel_values)
        mask = None if pixel_values is not None else attention_mask
        return self.classify(self.pool(hidden, mask), labels)


def checkpoint_pooling(path: str | None) -> Pooling | None:
    """The pooling a sentence-transformers checkpoint was trained with, if it says."""
    if path is None:
        return None
    config = Path(path) / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    try:
        modes = json.loads(config.read_text())
    except json.JSONDecodeError:
        return None
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    if modes.get("pooling_mode_lasttoken"):
        return "last"
    return None


def auto_pooling(source: ModelSource) -> Pooling:
    """The checkpoint's own pooling if it records one; else mean for text encoders
    (generic ones too), last token for decoders (generic ones too), CLS for image
    models (ViT, DINOv2)."""
    recorded = checkpoint_pooling(source.path)
    if recorded is not None:
        return recorded
    if source.family in DECODER_FAMILIES:
        return "last"
    if source.family in IMAGE_FAMILIES:
        return "cls"
    return "mean"


def build_classifier(
    model_cfg: ModelConfig,
    num_labels: int,
    *,
    problem: str = "classification",
    label_smoothing: float = 0.0,
    seed: int = 0,
) -> tuple[nn.Module, Any, ModelSource]:
    """(model, tokenizer, source) for `model_cfg`.

    The model is a SequenceClassifier, wrapped by peft when `model_cfg.lora` is set
    (`unwrap(model)` gives the SequenceClassifier back), its frozen base stored in
    `model_cfg.base_dtype` (`cotune.models.base_dtype`), returned in eval mode. The
    tokenizer is None for image models. Tiny backbones and the head are initialised
    from `seed`.
    """
    if problem not in PROBLEMS:
        raise ModelError(f"problem {problem!r} is not valid; valid: {', '.join(PROBLEMS)}")
    if problem == "regression" and num_labels != 1:
        raise ModelError(f"a regression task has 1 output, not num_labels={num_labels}")
    if num_labels < 1:
        raise ModelError(f"num_labels must be at least 1, got {num_labels}")
    if num_labels == 1:
        problem = "regression"
    source = resolve(model_cfg.name)
    pooling: Pooling = auto_pooling(source) if model_cfg.pooling == "auto" else model_cfg.pooling
    backbone = load_backbone(model_cfg.name, seed=seed)
    tokenizer = load_tokenizer(model_cfg.name)
    dropout = getattr(backbone.config, "hidden_dropout_prob", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SequenceClassifier(
            backbone,
            num_labels,
            family=source.family,
            pooling=pooling,
            dropout=0.1 if dropout is None else float(dropout),
            problem=problem,  # type: ignore[arg-type]
            label_smoothing=label_smoothing,
        )
        std = getattr(backbone.config, "initializer_range", 0.02)
        nn.init.normal_(model.head.weight, mean=0.0, std=std)
        nn.init.zeros_(model.head.bias)
    model.eval()  # like from_pretrained; training loops call model.train()
    if model_cfg.lora is not None:
        from cotune.models.lora import apply_lora

        wrapped = apply_lora(model, model_cfg.lora, source.family)
        return apply_base_dtype(wrapped, model_cfg.base_dtype), tokenizer, source
    return apply_base_dtype(model, model_cfg.base_dtype), tokenizer, source
