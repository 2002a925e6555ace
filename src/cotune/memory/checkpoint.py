"""Activation checkpointing of transformer layers (`memory.checkpoint`).

Every transformers layer in a module subtree (a `GradientCheckpointingLayer`: the BERT,
RoBERTa, DistilBERT, Llama, GPT-2 and ViT layers) gets transformers' own switch, its
`gradient_checkpointing` flag and `_gradient_checkpointing_func`, which the layer's
forward calls with itself. The switch lives on the layer, so it works wherever the layer
is called from: the whole model, or cotune's split segments, which call the layers one
by one. The function is `torch.utils.checkpoint.checkpoint` with `use_reentrant=False`:
the layer's forward keeps only its inputs, and backward runs the layer's forward again
to get what it saves, one layer at a time.

With a sparse mode (`cotune.memory.swap`) the swapped ops inside a layer save sparsely
when the layer is recomputed, and backward uses only those saves. The recomputation
replays the forward exactly: torch restores the global RNG (dropout masks), and the
contexts passed to checkpoint here restore what the sparse ops read besides their
inputs, the private generator of `random` and `backrazor` (the same rows, the same
thresholds) and the token mask (which rows are padding). So checkpointing changes no
gradient, with or without a sparse mode. The layer's forward also counts its saves for
`SavedTensorMeter` (`measure.recompute_region`).

With `chunks > 1` (`memory.checkpoint_chunks`) a checkpointed layer runs over the batch
in that many slices, each checkpointed on its own, and the outputs are concatenated.
The forward pass and each recomputation then hold one slice's temporaries (attention
scores, FFN intermediates) instead of the whole batch's; the autograd engine runs one
slice's recomputation and backward before the next, and a parameter's gradient is still
accumulated once (its contributions are summed before its accumulation node runs, so
`memory.step_in_backward` steps it once). Every per-example computation is unchanged and
the sparse modes rank rows per sequence, so gradients equal the unchunked ones up to
float summation order; what changes is the order of random draws (dropout masks and the
`random` mode's rows are drawn slice by slice: the same distribution, other values).
Tensors of the call whose first dimension is the batch are sliced (positional ones, the
layer's keyword ones and those inside tuples and lists), and so is the token mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cotune.errors import ModelError
from cotune.memory.measure import recompute_region
from cotune.memory.pack import Policy, current_token_mask, hold_last_pack, token_mask

_FLAG = "gradient_checkpointing"
_FUNC = "_gradient_checkpointing_func"
_PREV = "_cotune_checkpoint_prev"  # the module's own values of _FLAG / _FUNC before


def _layer_class() -> type[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return GradientCheckpointingLayer


def _policies(module: nn.Module) -> list[Policy]:
    found: dict[int, Policy] = {}
    for m in module.modules():
        policy = m.__dict__.get("_cotune_policy")
        if isinstance(policy, Policy):
            found[id(policy)] = policy
    return list(found.values())


class _Replay:
    """What the sparse ops of one checkpointed layer call read besides their inputs:
    captured when the layer runs forward, put back while backward recomputes it."""

    def __init__(self, layer: nn.Module) -> None:
        generators: dict[int, torch.Generator] = {}
        for policy in _policies(layer):
            policy.generator(torch.device("cpu"))  # created now: its state is captured
            for g in policy._generators.values():
                generators[id(g)] = g
        self.generators = list(generators.values())
        self.states: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.mask = current_token_mask()
        self.states = [g.get_state() for g in self.generators]
        with hold_last_pack(), recompute_region():
            yield

    @contextmanager
    def recompute(self) -> Iterator[None]:
        now = [g.get_state() for g in self.generators]
        for g, state in zip(self.generators, self.states, strict=True):
            g.set_state(state)
        try:
            with token_mask(self.mask), hold_last_pack():
                yield
        finally:
            # the generators continue as if nothing had been drawn again
            for g, state in zip(self.generators, now, strict=True):
                g.set_state(state)


class _Reenterable(AbstractContextManager[None]):
    """A context manager made afresh on every entry (checkpoint enters its recompute
    context once per backward pass over the layer)."""

    def __init__(self, make: Callable[[], AbstractContextManager[None]]) -> None:
        self._make = make
        self._stacks: list[ExitStack] = []

    def __enter__(self) -> None:
        stack = ExitStack()
        stack.enter_context(self._make())
        self._stacks.append(stack)

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._stacks.pop().__exit__(*exc))


def _take(value: Any, batch: int, rows: slice) -> Any:
    """`value` with its batch rows `rows` when its first dimension is the batch (tensors
    of 2 or more dimensions; tuples, lists and dicts element by element), else as it is."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _take(v, batch, rows) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, batch, rows) for v in value)
    return value


def _concat(outs: list[Any], sizes: list[int], layer: nn.Module) -> Any:
    """The slices' outputs joined along the batch: tensors concatenated, tuples element
    by element, None kept."""
    first = outs[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if first.dim() >= 1 and all(o.shape[0] == n for o, n in zip(outs, sizes, strict=True)):
            return torch.cat(outs)
    elif isinstance(first, (tuple, list)):
        return type(first)(_concat(list(parts), sizes, layer) for parts in zip(*outs, strict=True))
    raise ModelError(
        f"memory.checkpoint_chunks cannot join the outputs of {type(layer).__name__} over "
        f"the batch (a {type(first).__name__} that is not one row per example); "
        "set memory.checkpoint_chunks = 1 for this model"
    )


class CheckpointFunction:
    """The `_gradient_checkpointing_func` cotune gives a layer: non-reentrant
    `torch.utils.checkpoint` with the contexts that replay the sparse ops' draws, over
    `chunks` slices of the batch."""

    def __init__(self, layer: nn.Module, chunks: int = 1) -> None:
        if chunks < 1:
            raise ValueError(f"chunks must be at least 1, got {chunks}")
        self.layer = layer
        self.chunks = chunks

    def _checkpoint(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        replay = _Replay(self.layer)

        def contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
            return _Reenterable(replay.forward), _Reenterable(replay.recompute)

        return checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else None
        batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() >= 2 else 1
        if self.chunks == 1 or batch < 2:
            return self._checkpoint(function, *args, **kwargs)
        mask = current_token_mask()
        outs, sizes = [], []
        for idx in torch.arange(batch).tensor_split(min(self.chunks, batch)):
            rows = slice(int(idx[0]), int(idx[-1]) + 1)
            part: Callable[..., Any] = function
            if isinstance(function, functools.partial):  # transformers' forward + kwargs
                part = functools.partial(function.func, *_take(function.args, batch, rows),
                                         **_take(function.keywords, batch, rows))  # fmt: skip
            with token_mask(mask[rows] if mask is not None and mask.shape[0] == batch else mask):
                outs.append(self._checkpoint(part, *_take(args, batch, rows),
                                             **_take(kwargs, batch, rows)))  # fmt: skip
            sizes.append(rows.stop - rows.start)
        return _concat(outs, sizes, self.layer)


def _owns_flag(module: nn.Module, layer_cls: type[nn.Module]) -> bool:
    return isinstance(module, layer_cls) or _FLAG in module.__dict__


def checkpoint_layers(model: nn.Module, chunks: int = 1) -> int:
    """Turn on activation checkpointing for every transformer layer in `model` (any
    module subtree, in place), each layer run over `chunks` slices of the batch; returns
    how many layers are checkpointed.

    Like transformers' `gradient_checkpointing_enable`, modules of the subtree that
    carry their own `gradient_checkpointing` flag (e.g. GPT2Model, which then passes no
    KV cache) get it set too. Only layers in training mode with gradients enabled are
    checkpointed (evaluation runs them as usual). Raises `ModelError` if `model` has no
    transformers layer.
    """
    layer_cls = _layer_class()
    n = 0
    for module in model.modules():
        if not _owns_flag(module, layer_cls):
            continue
        if _PREV not in module.__dict__:
            module.__dict__[_PREV] = {
                k: module.__dict__[k] for k in (_FLAG, _FUNC) if k in module.__dict__
            }
        setattr(module, _FLAG, True)
        setattr(module, _FUNC, CheckpointFunction(module, chunks))
        n += isinstance(module, layer_cls)
    if n == 0:
        uncheckpoint_layers(model)
        raise ModelError(
            f"memory.checkpoint found no transformer layer to checkpoint in "
            f"{type(model).__name__}; it checkpoints transformers' layer modules "
            "(GradientCheckpointingLayer: BERT, RoBERTa, DistilBERT, Llama, GPT-2, ViT "
            "families)"
        )
    return n


def uncheckpoint_layers(model: nn.Module) -> None:
    """Undo `checkpoint_layers` in place: every flag and function as it was before."""
    for module in model.modules():
        prev = module.__dict__.pop(_PREV, None)
        if prev is None:
            continue
        for key in (_FLAG, _FUNC):
            module.__dict__.pop(key, None)
        module.__dict__.update(prev)


def checkpointed_layers(model: nn.Module) -> int:
    """How many transformer layers of `model` `checkpoint_layers` has switched on."""
    layer_cls = _layer_class()
    return sum(
        1
        for m in model.modules()
        if isinstance(m, layer_cls) and _PREV in m.__dict__ and m.__dict__.get(_FLAG) is True
    )
