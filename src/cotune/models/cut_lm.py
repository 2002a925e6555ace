"""Cutting a causal LM (Llama, Gemma 3, GPT-2 families) into device / cloud / LM-head segments.

The same pieces as `cotune.models.cut` (the family ops, `DeviceSegment`, the cloud
layers), built from the causal LM's own modules: the device runs the embeddings and
layers `< cut`; the cloud runs layers `>= cut` and the final norm and returns hidden
states for every token (no pooling); the head is the LM head plus the completion-only
loss (`cotune.models.causal_lm.completion_loss`), after Gemma's final logit soft-capping
when the config has one (`logits = c * tanh(logits / c)`, as the HF model does).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cotune.errors import ModelError
from cotune.models.causal_lm import LMOutput, completion_loss, completion_mask
from cotune.models.cut import (
    FAMILY_OPS,
    HFModule,
    SplitClassifier,
    TokenCloudSegment,
    cut_parts,
)
from cotune.models.lora import unwrap


class LMHeadSegment(nn.Module):
    """The LM head and the completion-only, label-smoothed next-token loss."""

    def __init__(
        self, lm_head: nn.Module, label_smoothing: float, softcap: float | None = None
    ) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.label_smoothing = label_smoothing
        self.softcap = softcap

    def forward(
        self, hidden: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> LMOutput:
        """`mask` is unused: the labels are -100 wherever there is no loss. With labels the
        head runs only at the completion positions the loss reads."""
        kept = None if labels is None else completion_mask(labels)
        logits = self.lm_head(hidden if kept is None else hidden[kept])
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if labels is None:
            return LMOutput(loss=None, logits=logits)
        loss = completion_loss(logits, labels, self.label_smoothing, kept)
        return LMOutput(loss=loss, logits=logits, kept=kept)


# the causal-LM families whose layout the cut knows
LM_CUT_FAMILIES: tuple[str, ...] = ("llama", "gemma3", "gpt2")


def cut_causal_lm(
    model: nn.Module, cut: int, *, label_smoothing: float = 0.0, sft_rank: int | None = None
) -> SplitClassifier:
    """Cut a causal LM (a `CompletionLM`, or a peft-wrapped / plain HF causal LM) at
    layer `cut`. Labels (next tokens) live on the cloud with the LM head."""
    lm = getattr(model, "lm", model)
    base: HFModule = unwrap(lm)  # the HF causal LM
    family = getattr(base.config, "model_type", "")
    family = {"mistral": "llama", "qwen2": "llama"}.get(family, family)
    family = {"gemma3_text": "gemma3"}.get(family, family)
    if family not in LM_CUT_FAMILIES:
        raise ModelError(
            f"splitfed cuts causal LMs of the {', '.join(LM_CUT_FAMILIES)} families, not {family!r}"
        )
    backbone = base.base_model
    device, cloud, width, names = cut_parts(
        model, FAMILY_OPS[family], backbone, cut, sft_rank=sft_rank, uses_token_type_ids=False,
        pooling="last", cloud_cls=TokenCloudSegment,
    )  # fmt: skip
    return SplitClassifier(
        names=names,
        device=device,
        cloud=cloud,
        head=LMHeadSegment(
            base.get_output_embeddings(),
            label_smoothing,
            getattr(base.config, "final_logit_softcapping", None),
        ),  # fmt: skip
        labels="cloud",
        width=width,
        hidden_size=int(backbone.config.hidden_size),
        cut=cut,
        family=family,
    )
