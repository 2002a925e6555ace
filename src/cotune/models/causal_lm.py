"""A causal LM fine-tuned on completions: the completion-only loss and the model wrapper.

`CompletionLM` wraps a (peft) causal LM so that `model(input_ids, attention_mask,
labels=...)` returns `.loss` and `.logits` like the classifiers, so every training loop
and method trains it unchanged. `build_lm` builds it (with LoRA when configured) the
same way on every party that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cotune.config.schema import ModelConfig
from cotune.data.pairs import IGNORE
from cotune.models.base_dtype import apply_base_dtype
from cotune.models.lora import apply_lora
from cotune.models.rng import RNG_LOCK
from cotune.models.zoo import load_causal_lm, load_tokenizer, resolve


@dataclass
class LMOutput:
    loss: Tensor | None
    logits: Tensor


def completion_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (logits at
    position t predict the token at t + 1), with label smoothing."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    gold = labels[:, 1:].reshape(-1)
    return nn.functional.cross_entropy(
        pred, gold, ignore_index=IGNORE, label_smoothing=label_smoothing
    )


class CompletionLM(nn.Module):
    """A causal LM (peft-wrapped or not) whose loss is `completion_loss`."""

    def __init__(self, lm: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.lm = lm
        self.label_smoothing = label_smoothing

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> LMOutput:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = None if labels is None else completion_loss(logits, labels, self.label_smoothing)
        return LMOutput(loss=loss, logits=logits)


def build_lm(
    model_cfg: ModelConfig, *, seed: int, label_smoothing: float = 0.0
) -> tuple[CompletionLM, Any, str]:
    """(model, tokenizer, family) for `model_cfg`: the causal LM with LoRA when
    `model_cfg.lora` is set (LoRA initialised from `seed`, so every party that builds it
    gets the same weights), its frozen base stored in `model_cfg.base_dtype`, in eval
    mode."""
    source = resolve(model_cfg.name)
    tokenizer = load_tokenizer(model_cfg.name)
    # Building draws from torch's global RNG (tiny random weights, LoRA init): hold the
    # lock private RNG streams take, so threads (splitfed's simulated devices) neither
    # build at once nor swap RNG states mid-build.
    with RNG_LOCK:
        lm: nn.Module = load_causal_lm(model_cfg.name, seed=seed)
        if model_cfg.lora is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lm = apply_lora(lm, model_cfg.lora, source.family)
    apply_base_dtype(lm, model_cfg.base_dtype)
    model = CompletionLM(lm, label_smoothing)
    model.eval()
    return model, tokenizer, source.family


def generation_model(model: nn.Module) -> nn.Module:
    """The module with `.generate` inside a `CompletionLM`."""
    return model.lm if isinstance(model, CompletionLM) else model
