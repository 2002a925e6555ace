"""LayerNorm and RMSNorm that save a sparse normalised input.

LayerNorm: y = x_hat * w + b with x_hat = (x - mean) * rstd. Backward, with g = dy * w:

    dw = sum_t dy_t * x_hat_t          (a sum over token rows: sparse, rescaled like dW)
    db = sum_t dy_t                    (exact, needs nothing)
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))

The per-row `rstd` (one float per token) is always kept. For a dropped row the last
term, the projection of g onto x_hat, is unknown and taken as zero, so dx becomes
rstd * (g - mean(g)): the gradient still flows through every token of the residual
stream, and is exact for kept rows. With backrazor x_hat is the element-sparse
reconstruction. RMSNorm is the same without the mean: dx = rrms * (g - x_hat *
mean(g * x_hat)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cotune.memory.pack import Policy, SaveList, pack


def _is_stock_layer_norm(forward: Callable[..., torch.Tensor]) -> bool:
    """forward is nn.LayerNorm's own, over the last dimension only."""
    if getattr(forward, "__func__", None) is not nn.LayerNorm.forward:
        return False
    return len(forward.__self__.normalized_shape) == 1  # type: ignore[attr-defined]


def _autocast(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


class SparseNormFunction(torch.autograd.Function):
    """Exact forward (stock module); saves sparse x_hat and the dense per-row scale."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        stock_forward: Callable[[torch.Tensor], torch.Tensor],
        policy: Policy,
        eps: float,
        centered: bool,
    ) -> torch.Tensor:
        xf = x.float()
        if centered and _is_stock_layer_norm(stock_forward) and not _autocast(x):
            # the kernel F.layer_norm runs, which also returns the statistics backward needs
            y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
            x_hat = (xf - mean.float()).mul_(rstd.float())  # one temporary, not two
            rstd = rstd.float()
        elif centered:
            y = stock_forward(x)
            mean = xf.mean(-1, keepdim=True)
            rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
            x_hat = (xf - mean).mul_(rstd)
        else:
            y = stock_forward(x)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            x_hat = xf * rstd
        saves = SaveList()
        saves.add(pack(x_hat.to(x.dtype), policy))
        saves.add_tensor(rstd)
        saves.add_tensor(weight)
        ctx.metas = saves.metas
        ctx.centered = centered
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(*saves.tensors)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, rs, ws = SaveList.restore(ctx.metas, ctx.saved_tensors)
        assert xs is not None and rs is not None
        rstd = rs.dense()
        dyf = dy.float()
        x_hat = xs.dense().float()
        weight = ws.dense() if ws is not None else None
        g = dyf * weight.float() if weight is not None else dyf
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            proj = (g * x_hat).mean(-1, keepdim=True)
            centred = g - g.mean(-1, keepdim=True) if ctx.centered else g
            dx = (rstd * (centred - x_hat * proj)).to(ctx.x_dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            x_hat_w = xs.dense(scaled=True).float() if xs.row_scale() is not None else x_hat
            dw = (dyf * x_hat_w).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = (
                dyf.reshape(-1, dy.shape[-1])
                .sum(0)
                .to(weight.dtype if weight is not None else dy.dtype)
            )
        return dx, dw, db, None, None, None, None
