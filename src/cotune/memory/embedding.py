"""Sparse gradients for embedding tables (`memory.step_in_backward`).

A trainable word-embedding table's dense gradient is as large as the table (minilm:
30,522 x 384 fp32 = 45 MiB) although a batch uses a few thousand of its rows; with the
optimiser stepped inside backward, that gradient is the largest buffer of the step's
end. `sparse_embedding_grads` makes such tables produce torch's sparse gradient (the
rows used, `nn.Embedding(sparse=True)`), which `training.optim.StepInBackward` steps
in blocks of rows: the update is AdamW's on the dense gradient, element for element.
A table whose weight is shared with a dense user (a tied LM head) still ends with a
dense gradient (autograd adds the two); nothing changes for it.
"""

from __future__ import annotations

from torch import nn

_PREV = "_cotune_sparse_prev"  # the module's own `sparse` before


def sparse_embedding_grads(model: nn.Module) -> int:
    """Give every `nn.Embedding` of `model` with a trainable weight sparse gradients (in
    place); returns how many were switched."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            if not module.sparse and _PREV not in module.__dict__:
                module.__dict__[_PREV] = module.sparse
                module.sparse = True
                n += 1
    return n


def dense_embedding_grads(model: nn.Module) -> None:
    """Undo `sparse_embedding_grads` in place."""
    for module in model.modules():
        prev = module.__dict__.pop(_PREV, None)
        if prev is not None:
            module.sparse = prev
