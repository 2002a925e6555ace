"""Building the model each party trains, and moving its trainable state.

The state that travels is exactly the model's trainable tensors by parameter name
(`cotune.models.adapter_state_dict`): every weight under full fine-tuning (fedavg), the
LoRA A/B matrices and the classifier head under LoRA (fedlora, fedkd). Two models
built from the same config have the same names and shapes, and their frozen weights
are identical (pre-trained, or initialised from the seed), so loading the trainable
state reproduces the sender's model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cotune.config import Config
from cotune.config.schema import ModelConfig
from cotune.methods.federated.data import task_for
from cotune.models import adapter_state_dict, build_classifier, load_adapter_state_dict

State = dict[str, np.ndarray]


def build_model(cfg: Config, model_cfg: ModelConfig | None = None) -> tuple[nn.Module, Any]:
    """A fresh (model, tokenizer) for `cfg`'s task: the student unless `model_cfg` is given."""
    task = task_for(cfg)
    if task.kind == "generation":  # e2e: the causal LM (+ LoRA), completion-only loss
        from cotune.methods.lm import build_lm

        model, tokenizer, _ = build_lm(cfg)
        return model, tokenizer
    model, tokenizer, _ = build_classifier(
        model_cfg or cfg.model,
        task.num_labels,
        problem=task.kind,
        label_smoothing=cfg.train.label_smoothing,
        seed=cfg.seed,
    )
    return model, tokenizer


def get_state(model: nn.Module) -> State:
    """The trainable tensors as numpy arrays (what goes into an ArrayRecord)."""
    return {k: v.cpu().numpy() for k, v in adapter_state_dict(model).items()}


def set_state(model: nn.Module, state: State) -> None:
    """Load `state` into the model's trainable tensors (names and shapes must match)."""
    load_adapter_state_dict(model, {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
