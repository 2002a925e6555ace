"""FFN activations, gated MLP products and dropout, without dense saved copies.

- Activation y = f(x) (GELU in its variants, SiLU, ReLU): backward needs f'(x). Kept rows
  (backrazor: kept elements) of x are saved and f' is recomputed on them exactly (by
  autograd on the module's own forward, so any formula variant is differentiated as
  written). For every element the sign of x is kept as one bit, and dropped entries use
  the ReLU derivative 1[x > 0] as a surrogate, so the gradient still reaches every token.
  For ReLU the bits are the exact derivative and no values are saved at all.
- Gated product y = f(g) * u (Llama-style MLP): d_u = dy f(g) and d_g = dy u f'(g) need
  the values of both g and u, so the same rows (elements) of both are kept, chosen on the
  product y; dropped entries get zero gradient through the gate (the residual path still
  carries theirs). With `random` + `rescale` kept rows are weighted by 1 / P(kept), which
  makes the exact-or-zero gradient unbiased.
- Dropout: the same mask as stock dropout (same generator calls), kept as 1 bit per
  element instead of a byte. Exact. (Regenerating the mask from the saved generator state
  would save no bytes at all but doubles the Bernoulli sampling, which on a CPU costs more
  step time than the bits cost memory.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cotune.memory import kernels
from cotune.memory.pack import (
    Policy,
    SaveList,
    pack,
    pack_dense,
    pack_elems,
    pack_positive,
    pack_rows,
    select_elems,
    select_rows,
)


def _grad_of(
    fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], dy: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    with torch.enable_grad():
        out = fn(*leaves)
    return torch.autograd.grad(out, leaves, dy)


class SparseActivationFunction(torch.autograd.Function):
    """y = f(x) with f the stock module's forward; sparse x + sign bits saved."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        stock_forward: Callable[[torch.Tensor], torch.Tensor],
        policy: Policy,
        is_relu: bool,
    ) -> torch.Tensor:
        y = stock_forward(x)
        saves = SaveList()
        exact = policy.keep >= 1.0
        if exact and not is_relu:
            saves.add(pack_dense(x))
            saves.add(None)
        else:
            saves.add(None if is_relu else pack(x, policy))
            saves.add(pack_positive(x))
        ctx.metas = saves.metas
        ctx.fn = stock_forward
        ctx.save_for_backward(*saves.tensors)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, bits = SaveList.restore(ctx.metas, ctx.saved_tensors)
        if xs is not None and xs.kind == "dense":
            (dx,) = _grad_of(ctx.fn, (xs.dense(),), dy)
            return dx, None, None, None
        assert bits is not None
        dx = bits.where_set(dy)
        if xs is None:  # ReLU: the sign bits are its exact derivative
            return dx, None, None, None
        if xs.kind == "rows":
            (d_rows,) = _grad_of(ctx.fn, (xs.values,), xs.gather_rows(dy))
            dx = xs.scatter_rows(d_rows.to(dx.dtype), dx)
        else:  # f' on the kept elements only, written over the surrogate
            dy_kept = kernels.compress(dy, xs.bits)
            (d_kept,) = _grad_of(ctx.fn, (xs.values,), dy_kept.to(xs.values.dtype))
            dx = kernels.overwrite(dx.contiguous(), xs.bits, d_kept.to(dx.dtype))
        return dx, None, None, None


class SparseGatedFunction(torch.autograd.Function):
    """y = act(g) * u; the same rows (elements) of g and u are kept, chosen on y."""

    @staticmethod
    def forward(
        ctx: Any,
        g: torch.Tensor,
        u: torch.Tensor,
        act: Callable[[torch.Tensor], torch.Tensor],
        policy: Policy,
    ) -> torch.Tensor:
        y = act(g) * u
        saves = SaveList()
        if policy.keep >= 1.0:
            saves.add(pack_dense(g))
            saves.add(pack_dense(u))
        elif policy.mode == "backrazor":
            mask = select_elems(y, policy)
            saves.add(pack_elems(g, mask))
            saves.add(pack_elems(u, mask))
        else:
            idx, scale = select_rows(y, policy)
            saves.add(pack_rows(g, idx, scale))
            saves.add(pack_rows(u, idx, None))
        ctx.metas = saves.metas
        ctx.act = act
        ctx.save_for_backward(*saves.tensors)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gs, us = SaveList.restore(ctx.metas, ctx.saved_tensors)
        assert gs is not None and us is not None
        act = ctx.act

        def gated(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return act(g) * u

        if gs.kind == "rows":
            dy_rows = gs.gather_rows(dy)
            scale = gs.row_scale()
            if scale is not None:
                dy_rows = dy_rows * scale.to(dy.dtype)
            d_g, d_u = _grad_of(gated, (gs.values, us.values), dy_rows)
            dg = gs.scatter_rows(d_g.to(dy.dtype), torch.zeros_like(dy))
            du = gs.scatter_rows(d_u.to(dy.dtype), torch.zeros_like(dy))
            return dg, du, None, None
        dg, du = _grad_of(gated, (gs.dense(), us.dense()), dy)
        mask = gs.elem_mask()
        if mask is not None:
            dg = dg * mask
            du = du * mask
        return dg, du, None, None


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The Bernoulli(1 - p) keep mask stock dropout draws (same generator calls, so the
    same mask for the same RNG state)."""
    return torch.empty_like(x).bernoulli_(1 - p)


def dropout_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """`dropout_mask` as bools, a quarter of the memory of an fp32 mask: the same
    generator calls give the same draws whatever the tensor's dtype (tested)."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)


class BitMaskDropoutFunction(torch.autograd.Function):
    """Dropout that saves its mask as bits (stock dropout keeps a byte per element)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = dropout_mask(x, p)
        saves = SaveList()
        saves.add(pack_positive(mask))
        ctx.metas = saves.metas
        ctx.p = p
        ctx.save_for_backward(*saves.tensors)
        # into the mask's buffer: x * mask * s bit for bit (IEEE products commute), one
        # tensor of x's size fewer
        return mask.mul_(x).mul_(1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (bits,) = SaveList.restore(ctx.metas, ctx.saved_tensors)
        assert bits is not None
        return bits.where_set(dy).mul_(1.0 / (1.0 - ctx.p)), None
