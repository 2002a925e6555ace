"""A causal LM fine-tuned on completions: the completion-only loss and the model wrapper.

`CompletionLM` wraps a (peft) causal LM so that `model(input_ids, attention_mask,
labels=...)` returns `.loss` and `.logits` like the classifiers, so every training loop
and method trains it unchanged. `build_lm` builds it (with LoRA when configured) the
same way on every party that needs it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers.modeling_utils import slice_logits_to_keep

from cotune.config.schema import ModelConfig
from cotune.data.pairs import IGNORE
from cotune.models.base_dtype import apply_base_dtype
from cotune.models.lora import apply_lora
from cotune.models.rng import RNG_LOCK
from cotune.models.zoo import load_causal_lm, load_tokenizer, resolve


@dataclass
class LMOutput:
    loss: Tensor | None
    # [B, L, V]; with labels, only where `kept` is true: [kept.sum(), V]
    logits: Tensor
    kept: Tensor | None = None


def completion_mask(labels: Tensor) -> Tensor:
    """[B, L] bool: the positions whose logits predict a completion token (t with
    labels[:, t + 1] not -100), the only logits the completion-only loss reads. With a
    vocabulary of 262,144 (Gemma 3) the LM head and its float32 logits are most of a
    step's compute and memory; on E2E a third of the positions are completions, the rest
    prompt and padding."""
    kept = torch.zeros_like(labels, dtype=torch.bool)
    kept[:, :-1] = labels[:, 1:] != IGNORE
    return kept


def completion_loss(
    logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, kept: Tensor | None = None
) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (logits at
    position t predict the token at t + 1), with label smoothing. With `kept`
    (`completion_mask(labels)`), `logits` holds only those positions' logits, in row-major
    order ([kept.sum(), V]); the loss is the same."""
    if kept is None:
        pred, gold = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    else:
        pred, gold = logits, labels[:, 1:][kept[:, :-1]]
    return nn.functional.cross_entropy(
        pred.float(), gold, ignore_index=IGNORE, label_smoothing=label_smoothing
    )


def keeps_masked_logits(lm: nn.Module) -> bool:
    """Whether the HF causal LM under `lm` (peft-wrapped or not) computes logits only where
    a boolean `logits_to_keep` mask is true: its class slices with transformers'
    `slice_logits_to_keep` (Llama, Gemma 3, GPT-2, Qwen2 and nearly every causal LM of
    transformers 5), which flattens the kept positions to [N, H]."""
    base = lm.get_base_model() if isinstance(lm, PeftModel) else lm
    module = inspect.getmodule(type(base))
    return getattr(module, "slice_logits_to_keep", None) is slice_logits_to_keep


class CompletionLM(nn.Module):
    """A causal LM (peft-wrapped or not) whose loss is `completion_loss`."""

    def __init__(self, lm: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.lm = lm
        self.label_smoothing = label_smoothing
        self.masks_logits = keeps_masked_logits(lm)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> LMOutput:
        """Logits at every position, or with `labels` (where the model can) only at the
        completion positions the loss reads (`completion_mask`)."""
        kept = completion_mask(labels) if labels is not None and self.masks_logits else None
        only = {} if kept is None else {"logits_to_keep": kept}
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, **only).logits
        loss = (
            None if labels is None else completion_loss(logits, labels, self.label_smoothing, kept)
        )
        return LMOutput(loss=loss, logits=logits, kept=kept)


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
