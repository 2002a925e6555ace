"""A cotune classifier as transformers custom code: a transformers base model, pooling,
dropout and a linear head.

This file is written next to an exported model's `config.json` (whose `auto_map` names
its classes), so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

(or `AutoModelForImageClassification`, `AutoModelForQuestionAnswering`) rebuilds the
model cotune trained without cotune installed. It imports only torch and transformers.
Module names (`backbone`, `head`) are those of cotune's own classifier, so a peft
adapter trained by cotune loads onto it with `PeftModel.from_pretrained`.

- `backbone`: the base model (`AutoModel.from_config(config.base_model_config)`),
  without a pooler (BERT, RoBERTa and ViT have one; it is never used).
- pooling (`config.pooling`): `mean` over real tokens (the attention mask), `cls` (the
  first token) or `last` (the last real token, for left or right padding).
- `dropout` (`config.classifier_dropout`), then `head`: Linear(hidden, num_labels).

With `num_labels == 1` the problem is regression (MSE); otherwise classification
(cross-entropy with `config.label_smoothing`). `CotuneForQuestionAnswering` skips
pooling: the head gives every token a start and an end logit.

`config.no_ffn_residual_layers`: layers whose FFN block has no residual connection.
Split fine-tuning with cotune's `sft` codec trains such a model: the cut runs through
layer `cut`'s FFN (the device sends an r-dim code of the FFN's input, the cloud goes
on from the FFN's pre-activation), so that layer's output is the FFN branch alone (the
output norm of post-norm models included), without the input it would be added to.
Forward hooks on the base model's own modules (`_FFN_BRANCH`) give that layer that
output; every other layer runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)

POOLINGS = ("mean", "cls", "last")

# model_type -> (the layer list (the first of these paths the base model has), the module
# whose output is a layer's FFN branch (its last call), the module that adds the residual
# to it: None when the layer returns branch + residual itself, else the norm whose input
# is branch + residual)
_BERT = (("encoder.layer",), "output.dropout", "output.LayerNorm")
_LLAMA = (("layers",), "mlp", None)
_FFN_BRANCH: dict[str, tuple[tuple[str, ...], str, str | None]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "distilbert": (("transformer.layer",), "ffn", "output_layer_norm"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma3_text": (("layers",), "post_feedforward_layernorm", None),
    "gpt2": (("h",), "mlp", None),
    "vit": (("layers", "encoder.layer"), "dropout", None),
    "dinov2": (("encoder.layer", "layers"), "drop_path", None),
}


class CotuneClassifierConfig(PretrainedConfig):
    """The base model's config (`base_model_config`, a dict with its `model_type`), the
    pooling, the head's dropout, whether token type ids reach the base model, and the
    label smoothing of the training loss; labels as in any transformers config."""

    model_type = "cotune_classifier"

    def __init__(
        self,
        base_model_config: dict[str, Any] | None = None,
        pooling: str = "mean",
        classifier_dropout: float = 0.1,
        use_token_type_ids: bool = False,
        label_smoothing: float = 0.0,
        no_ffn_residual_layers: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(base_model_config, PretrainedConfig):
            base_model_config = base_model_config.to_dict()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.base_model_config = dict(base_model_config or {})
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        self.use_token_type_ids = use_token_type_ids
        self.label_smoothing = label_smoothing
        self.no_ffn_residual_layers = list(no_ffn_residual_layers or [])
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        """The base model's config object."""
        values = dict(self.base_model_config)
        return AutoConfig.for_model(values.pop("model_type"), **values)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden[:, -1]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask > 0)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class _WithoutFfnResidual:
    """Makes one layer's output its FFN branch alone (see the module doc)."""

    def __init__(self, layer: nn.Module, branch: str, adds: str | None) -> None:
        self.branch: Any = None
        layer.get_submodule(branch).register_forward_hook(self._keep)
        if adds is None:
            layer.register_forward_hook(self._as_output)
        else:
            layer.get_submodule(adds).register_forward_pre_hook(self._as_input)

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        self.branch = output  # the last call's: the FFN branch, after attention's

    def _as_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        branch, self.branch = self.branch, None
        return (branch, *args[1:])

    def _as_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        branch, self.branch = self.branch, None
        return (branch, *output[1:]) if isinstance(output, tuple) else branch


class CotunePreTrainedModel(PreTrainedModel):
    config_class = CotuneClassifierConfig
    base_model_prefix = "cotune"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: CotuneClassifierConfig) -> None:
        super().__init__(config)
        base = config.base_config()
        # the base model attends the way the whole model was asked to
        implementation = getattr(config, "_attn_implementation", None)
        if implementation is not None:
            base._attn_implementation = implementation
        try:
            self.backbone = AutoModel.from_config(base)
        except ValueError:  # a base model without that attention (e.g. DeBERTa-v2: no sdpa)
            if implementation in (None, "eager"):
                raise
            base._attn_implementation = "eager"
            self.backbone = AutoModel.from_config(base)
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # cotune pools the hidden states itself
        if config.no_ffn_residual_layers:
            if base.model_type not in _FFN_BRANCH:
                raise ValueError(f"no_ffn_residual_layers is not supported for {base.model_type}")
            paths, branch, adds = _FFN_BRANCH[base.model_type]
            layers = next(
                self.backbone.get_submodule(p) for p in paths if _has_submodule(self.backbone, p)
            )
            for index in config.no_ffn_residual_layers:
                _WithoutFfnResidual(layers[index], branch, adds)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.head = nn.Linear(base.hidden_size, self.head_outputs(config))
        self.post_init()

    def head_outputs(self, config: CotuneClassifierConfig) -> int:
        return int(config.num_labels or 1)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def encode(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
    ) -> torch.Tensor:
        """The base model's last hidden states, (batch, tokens, hidden)."""
        if pixel_values is not None:
            return self.backbone(pixel_values=pixel_values).last_hidden_state
        if input_ids is None:
            raise ValueError("give input_ids (text) or pixel_values (images)")
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.config.use_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        return self.backbone(**kwargs).last_hidden_state


class CotuneForSequenceClassification(CotunePreTrainedModel):
    """Base model -> pooling -> dropout -> head (texts or images)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        hidden = self.encode(input_ids, attention_mask, token_type_ids, pixel_values)
        mask = None if pixel_values is not None else attention_mask
        if self.config.pooling == "mean":
            pooled = mean_pool(hidden, mask)
        elif self.config.pooling == "last":
            pooled = last_token_pool(hidden, mask)
        else:
            pooled = hidden[:, 0]
        logits = self.head(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(
                    logits.float(), labels.long(), label_smoothing=self.config.label_smoothing
                )
        return SequenceClassifierOutput(loss=loss, logits=logits)


class CotuneForQuestionAnswering(CotunePreTrainedModel):
    """Base model -> dropout -> head (hidden -> 2): each token's start and end logits."""

    def head_outputs(self, config: CotuneClassifierConfig) -> int:
        return 2

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> QuestionAnsweringModelOutput:
        hidden = self.encode(input_ids, attention_mask, token_type_ids, None)
        logits = self.head(self.dropout(hidden))
        start, end = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (
                nn.functional.cross_entropy(start.float(), start_positions.long())
                + nn.functional.cross_entropy(end.float(), end_positions.long())
            ) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end)
