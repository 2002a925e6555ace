"""Moving a model's trainable state in and out of a federated message.

The state that travels is exactly the model's trainable tensors by parameter name
(`cotune.models.adapter_state_dict`): every weight under full fine-tuning (fedavg), the
LoRA A/B matrices and the classifier head under LoRA (fedlora, fedkd). Two models built
from the same config have the same names and shapes, and their frozen weights are
identical (pre-trained, or initialised from the seed), so loading the trainable state
reproduces the sender's model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cotune.methods.spec import State
from cotune.models import adapter_state_dict, load_adapter_state_dict


def get_state(model: nn.Module) -> State:
    """The trainable tensors as numpy arrays (what goes into an ArrayRecord)."""
    return {k: v.cpu().numpy() for k, v in adapter_state_dict(model).items()}


def set_state(model: nn.Module, state: State) -> None:
    """Load `state` into the model's trainable tensors (names and shapes must match)."""
    load_adapter_state_dict(model, {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
