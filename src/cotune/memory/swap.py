"""The model-level switch: swap sparse-saving ops into any module subtree.

`apply_memory_option(module, cfg.memory)` walks the subtree and, in place:

- changes the class of each `nn.Linear` / GPT-2 `Conv1D` (op "linear"), `nn.LayerNorm` and
  Llama-style RMSNorm ("layernorm"), FFN activation module and Llama-style gated MLP
  ("activation") to a subclass whose forward uses the sparse-saving autograd functions;
  parameters, buffers, hooks, state-dict keys and peft wrappers are untouched;
- points each transformers attention module ("matmul", "softmax": every module whose
  forward dispatches through `ALL_ATTENTION_FUNCTIONS`, i.e. BERT, RoBERTa, DistilBERT,
  Llama, GPT-2, ViT) at the "cotune_sparse" attention function through a private copy of
  its config, so another segment sharing the config keeps its stock attention;
- swaps `nn.Dropout` for a dropout that keeps its mask as bits instead of bytes (exact,
  always on in a sparse mode);
- adds hooks on the subtree root that read an `attention_mask` argument so selection skips
  padding tokens.

Without gradients (evaluation) every swapped module runs its stock forward. Apply it after
LoRA wrapping (peft's `lora_A`/`lora_B` are plain Linear layers and are swapped too).
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cotune.errors import ModelError
from cotune.memory.activation import (
    BitMaskDropoutFunction,
    SparseActivationFunction,
    SparseGatedFunction,
)
from cotune.memory.attention import ATTN_NAME, register
from cotune.memory.linear import SparseLinearFunction
from cotune.memory.norm import SparseNormFunction
from cotune.memory.pack import _TOKEN_MASK, Policy, normalize_token_mask

_STOCK_ATTN = ("eager", "sdpa", None)


def stock_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """The module's forward as its original class defines it."""
    cls = getattr(module, "_cotune_stock_cls", type(module))
    return cls.forward.__get__(module)


def _grad_on(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The mixins are only ever mixed into the nn.Module subclass they name (`_sparse_class`),
# whose attributes they declare; type checkers see them as modules.
if TYPE_CHECKING:
    _Module = nn.Module
else:
    _Module = object


class _LinearMixin(_Module):
    weight: torch.Tensor
    bias: torch.Tensor | None
    _cotune_policy: Policy
    _cotune_transposed: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return SparseLinearFunction.apply(
                x,
                w,
                self.bias,
                stock_forward(self),
                self._cotune_policy,
                self._cotune_transposed,
            )
        return super().forward(x)


class _LayerNormMixin(_Module):
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    _cotune_policy: Policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 3 and _grad_on(x, self.weight):
            return SparseNormFunction.apply(
                x,
                self.weight,
                self.bias,
                stock_forward(self),
                self._cotune_policy,
                self.eps,
                True,
            )
        return super().forward(x)


class _RMSNormMixin(_Module):
    weight: torch.Tensor
    variance_epsilon: float
    _cotune_policy: Policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 3 and _grad_on(x, self.weight):
            return SparseNormFunction.apply(
                x, self.weight, None, stock_forward(self), self._cotune_policy,
                self.variance_epsilon, False,
            )  # fmt: skip
        return super().forward(x)


class _ActivationMixin(_Module):
    _cotune_policy: Policy
    _cotune_relu: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 3 and _grad_on(x):
            return SparseActivationFunction.apply(
                x,
                stock_forward(self),
                self._cotune_policy,
                self._cotune_relu,
            )
        return super().forward(x)


class _GatedMLPMixin(_Module):
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act_fn: nn.Module
    _cotune_policy: Policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        u = self.up_proj(x)
        act = stock_forward(self.act_fn)
        if g.dim() >= 3 and _grad_on(g, u):
            y = SparseGatedFunction.apply(g, u, act, self._cotune_policy)
        else:
            y = act(g) * u
        return self.down_proj(y)


class _DropoutMixin(_Module):
    p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        if self.training and 0 < p < 1 and _grad_on(x):
            return BitMaskDropoutFunction.apply(x, p)
        return super().forward(x)


_CLASSES: dict[tuple[type, type], type] = {}


def _sparse_class(cls: type, mixin: type) -> type:
    key = (cls, mixin)
    if key not in _CLASSES:
        name = f"Sparse{cls.__name__}"
        new = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        _CLASSES[key] = new
        globals().setdefault(name, new)  # importable by name, so pickling works
    return _CLASSES[key]


@cache
def _source(fn: Callable[..., Any]) -> str | None:
    try:
        return inspect.getsource(fn).strip()
    except (OSError, TypeError):
        return None


def _same_forward(cls: type[nn.Module], reference: type[nn.Module]) -> bool:
    return cls is reference or (
        _source(cls.forward) is not None and _source(cls.forward) == _source(reference.forward)
    )


def _activation_classes() -> tuple[set[type], set[type]]:
    from transformers import activations as a

    smooth = {
        a.GELUActivation, a.NewGELUActivation, a.GELUTanh, a.FastGELUActivation,
        a.QuickGELUActivation, a.AccurateGELUActivation, a.SiLUActivation, a.MishActivation,
        nn.GELU, nn.SiLU, nn.Mish,
    }  # fmt: skip
    return smooth, {nn.ReLU}


def _classify(module: nn.Module) -> tuple[str, type] | None:
    """(op name, mixin) for a module the memory option can swap, else None."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return "linear", _LinearMixin
    if cls is Conv1D:
        return "linear", _LinearMixin
    if isinstance(module, nn.LayerNorm) and cls.forward is nn.LayerNorm.forward:
        if len(module.normalized_shape) == 1:
            return "layernorm", _LayerNormMixin
        return None
    if cls.__name__.endswith("RMSNorm") and _same_forward(cls, LlamaRMSNorm):
        return "layernorm", _RMSNormMixin
    smooth, relu = _activation_classes()
    if cls in smooth or cls in relu:
        return "activation", _ActivationMixin
    if cls.__name__.endswith("MLP") and _same_forward(cls, LlamaMLP):
        return "activation", _GatedMLPMixin
    if cls is nn.Dropout:
        return "dropout", _DropoutMixin
    return None


def _is_attention(module: nn.Module) -> bool:
    fwd = getattr(type(module), "forward", None)
    # transformers wraps some forwards in decorators (deprecated-argument shims): look
    # at the function they wrap
    code = getattr(inspect.unwrap(fwd), "__code__", None) if fwd is not None else None
    return (
        code is not None
        and "ALL_ATTENTION_FUNCTIONS" in code.co_names
        and hasattr(getattr(module, "config", None), "_attn_implementation")
    )


def _patch_attention(module: Any, name: str) -> None:
    # `module` is a transformers attention module; its `config` and cotune's markers are
    # plain attributes, which nn.Module's attribute typing (Tensor | Module) does not cover.
    if getattr(module, "_cotune_stock_attn", "unset") != "unset":
        return
    stock = module.config._attn_implementation
    if stock not in _STOCK_ATTN:
        raise ModelError(
            f"memory.backward: module {name!r} uses attention implementation {stock!r}; "
            "sparse saving supports models loaded with 'eager' or 'sdpa' attention "
            "(or leave 'matmul' and 'softmax' out of memory.ops)"
        )
    module._cotune_stock_attn = stock
    module._cotune_stock_config = module.config
    config = copy.copy(module.config)
    config._attn_implementation_internal = (
        ATTN_NAME  # not the setter: it recurses into shared sub-configs
    )
    module.config = config


def _find_attention_mask(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
            mask = bound.arguments.get("attention_mask")
        except (TypeError, ValueError):
            mask = None
    return normalize_token_mask(mask) if isinstance(mask, torch.Tensor) else None


# The hooks' `module` is the subtree root holding `_cotune_mask_tokens`, a plain list.
def _pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    module._cotune_mask_tokens.append(_TOKEN_MASK.set(_find_attention_mask(module, args, kwargs)))


def _post_hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
    if module._cotune_mask_tokens:
        _TOKEN_MASK.reset(module._cotune_mask_tokens.pop())


def make_policy(memory: Any, seed: int | None = None) -> Policy:
    """A `Policy` from a `MemoryConfig` (mode must not be "none")."""
    return Policy(
        mode=memory.backward,
        keep=float(memory.keep),
        keep_of=memory.keep_of,
        rescale=bool(memory.rescale),
        norm=memory.norm,
        ops=frozenset(memory.ops),
        seed=int(torch.initial_seed() if seed is None else seed) % (2**63),
    )


def swap_in(model: nn.Module, policy: Policy) -> Counter[str]:
    """Swap the sparse ops `policy.ops` asks for into `model` (in place); counts per op."""
    register()
    counts: Counter[str] = Counter()
    for name, module in model.named_modules():
        if ("matmul" in policy.ops or "softmax" in policy.ops) and _is_attention(module):
            _patch_attention(module, name)
            module._cotune_policy = policy
            counts["attention"] += 1
        stock_cls = getattr(module, "_cotune_stock_cls", None)
        found = _classify(module) if stock_cls is None else _classify_stock(module, stock_cls)
        if found is None:
            continue
        op, mixin = found
        if op != "dropout" and op not in policy.ops:
            continue
        if stock_cls is None:
            module._cotune_stock_cls = type(module)
            module._cotune_relu = type(module) is nn.ReLU
            module._cotune_transposed = type(module).__name__ == "Conv1D"
            module.__class__ = _sparse_class(type(module), mixin)
        module._cotune_policy = policy
        counts[op] += 1
    if not any(v for k, v in counts.items() if k != "dropout"):
        raise ModelError(
            f"memory.backward = {policy.mode!r} found no layer it can make sparse in "
            f"{type(model).__name__} for memory.ops = {sorted(policy.ops)}; supported: "
            "Linear/Conv1D, LayerNorm/RMSNorm, FFN activations and transformers attention "
            "(BERT, RoBERTa, DistilBERT, Llama, GPT-2, ViT families)"
        )
    # (torch types Module.__setattr__ values as Tensor | Module; plain attributes such as
    # these take any value)
    if not hasattr(model, "_cotune_mask_tokens"):
        model._cotune_mask_tokens = []  # type: ignore[assignment]
        model._cotune_hooks = [  # type: ignore[assignment]
            model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
        ]
    model._cotune_memory_counts = dict(counts)  # type: ignore[assignment]
    return counts


_ATTRS = (
    "_cotune_policy",
    "_cotune_stock_cls",
    "_cotune_relu",
    "_cotune_transposed",
    "_cotune_stock_attn",
    "_cotune_stock_config",
)


def swap_out(model: nn.Module) -> None:
    """Undo `swap_in`: stock classes, stock attention, no hooks (parameters untouched)."""
    for module in model.modules():
        stock_cls = getattr(module, "_cotune_stock_cls", None)
        if stock_cls is not None:
            module.__class__ = stock_cls
        config = getattr(module, "_cotune_stock_config", None)
        if config is not None:
            module.config = config
        for attr in _ATTRS:
            module.__dict__.pop(attr, None)
    for handle in getattr(model, "_cotune_hooks", []):
        handle.remove()
    for attr in ("_cotune_hooks", "_cotune_mask_tokens", "_cotune_memory_counts"):
        model.__dict__.pop(attr, None)


def _classify_stock(module: nn.Module, stock_cls: type) -> tuple[str, type] | None:
    """Classification of an already swapped module by its original class."""
    current = module.__class__
    module.__class__ = stock_cls
    try:
        return _classify(module)
    finally:
        module.__class__ = current


def sparse_op_counts(model: nn.Module) -> dict[str, int]:
    """How many modules of each op kind `apply_memory_option` swapped into `model`."""
    return dict(getattr(model, "_cotune_memory_counts", {}))
