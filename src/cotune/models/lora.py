"""LoRA through peft, and the trainable-state helpers federated and split methods use.

`adapter_state_dict` / `load_adapter_state_dict` work on any module: they move exactly
the tensors that train (LoRA A/B and the head under LoRA; everything under full
fine-tuning), keyed by their `named_parameters` names, which are the same for two
models built the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel

from cotune.config.schema import LoraConfig
from cotune.errors import ModelError
from cotune.models.zoo import Family

# peft's own shorthand: every Linear / Conv1D but a causal LM's output layer
ALL_LINEAR = "all-linear"
# per named family; a family without an entry (the generic ones) gets ALL_LINEAR
DEFAULT_TARGETS: dict[Family, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "vit": ["q_proj", "v_proj"],  # transformers 5 renamed ViT's query/value to q_proj/v_proj
    "dinov2": ["q_proj", "v_proj"],  # likewise Dinov2's (k_proj, o_proj: key and output)
}


def _has_module(names: Sequence[str], key: str) -> bool:
    return any(n == key or n.endswith("." + key) for n in names)


def _is_causal_lm(model: nn.Module) -> bool:
    return isinstance(model, PreTrainedModel) and model.can_generate()


def apply_lora(
    model: nn.Module,
    lora_cfg: LoraConfig,
    family: Family,
    modules_to_save: Sequence[str] = ("head",),
    task_type: str | None = None,
) -> nn.Module:
    """Wrap `model` with LoRA adapters; only the adapters and `modules_to_save` train.

    Targets are `lora_cfg.target_modules`, else `DEFAULT_TARGETS[family]`, matched as
    module-name suffixes; a family without defaults (the generic `encoder` and
    `decoder`), or `target_modules = ["all-linear"]`, targets every linear layer (peft's
    `all-linear`: a causal LM's output layer excepted) other than `modules_to_save`,
    which train in full and are not LoRA-wrapped as well. Names in `modules_to_save`
    that the model lacks are skipped, so the default suits both SequenceClassifier
    (which has a `head`) and causal LMs. A causal LM gets peft's causal-LM wrapper (so
    `generate` works); `task_type` (a
    peft task type, e.g. "SEQ_CLS") overrides that choice (`cotune.export` writes
    adapters a standard loader recognises).
    """
    names = [n for n, _ in model.named_modules()]
    save = [m for m in modules_to_save if _has_module(names, m)]
    targets: list[str] | str = list(lora_cfg.target_modules or DEFAULT_TARGETS.get(family, []))
    if not targets or targets == [ALL_LINEAR]:
        targets = ALL_LINEAR
    missing = [] if targets == ALL_LINEAR else [t for t in targets if not _has_module(names, t)]
    if missing:
        linear_names = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
            }
        )
        raise ModelError(
            f"model.lora.target_modules: {', '.join(missing)} not found in this {family} "
            f"model; its linear layers are: {', '.join(linear_names)}"
        )
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        # peft annotates lora_alpha as int, but any number works (the scale is alpha / r)
        lora_alpha=lora_cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        # all-linear lists the head too (peft spares only a PreTrainedModel's output
        # layer); peft 0.21 keeps adapters off modules_to_save, this does not rely on it
        exclude_modules=(save or None) if targets == ALL_LINEAR else None,
        modules_to_save=save or None,
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores weights transposed
        bias="none",
        task_type=task_type or ("CAUSAL_LM" if _is_causal_lm(model) else None),
    )
    return get_peft_model(model, peft_cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a peft wrapper (e.g. the SequenceClassifier), or `model` itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the trainable tensors (LoRA A/B + head under LoRA), by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def describe_mismatch(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """'missing 2 (e.g. a, b); unexpected 1 (e.g. c)': tensor names a state lacks or
    has beyond a model's, for error messages."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
    return "; ".join(parts)


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy `state` into the trainable tensors of `model`; the names and shapes must be
    exactly those of `adapter_state_dict(model)`, else ModelError."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ModelError(
            "the adapter state does not match this model's trainable tensors: "
            + describe_mismatch(missing, unexpected)
            + ". Was it saved from a model with the same name, LoRA rank and targets?"
        )
    wrong = [
        f"{n}: {tuple(state[n].shape)} vs {tuple(p.shape)}"
        for n, p in params.items()
        if tuple(state[n].shape) != tuple(p.shape)
    ]
    if wrong:
        raise ModelError(
            "the adapter state has tensors of the wrong shape (given vs model): "
            + "; ".join(wrong[:3])
            + ". Was it saved from a model with the same name, LoRA rank and labels?"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(device=p.device, dtype=p.dtype))
