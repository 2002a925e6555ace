"""Linear layers (torch `nn.Linear`, GPT-2's `Conv1D`) that save a sparse input.

y = x W^T + b. Backward needs x only for the weight gradient dW = sum_t dy_t^T x_t, a
sum over token rows t; the input gradient dx = dy W and the bias gradient need no
activation, so they stay exact. Only kept rows (or, for backrazor, kept elements) of x
enter dW; with `random` and `rescale` each kept row is weighted by 1 / P(kept), which
makes dW an unbiased estimate of the dense one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cotune.memory.pack import Policy, SaveList, pack_shared


def _autocast(x: torch.Tensor) -> bool:
    return x.is_floating_point() and torch.is_autocast_enabled(x.device.type)


class SparseLinearFunction(torch.autograd.Function):
    """Exact forward (the stock module's own forward); sparse x saved for dW."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stock_forward: Callable[[torch.Tensor], torch.Tensor],
        policy: Policy,
        transposed: bool,
    ) -> torch.Tensor:
        y = stock_forward(x)
        saves = SaveList()
        # under autocast the matmul ran in the autocast dtype: keep x as the stock op would
        dtype = torch.get_autocast_dtype(x.device.type) if _autocast(x) else None
        saves.add(pack_shared(x, policy, dtype) if weight.requires_grad else None)
        saves.add_tensor(weight)
        ctx.metas = saves.metas
        ctx.transposed = transposed
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(*saves.tensors)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, ws = SaveList.restore(ctx.metas, ctx.saved_tensors)
        assert ws is not None
        weight = ws.dense()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dyf = dy.float()
        dx = dw = db = None
        if need_x:
            w = weight.float()
            dx = (dyf @ w if not ctx.transposed else dyf @ w.t()).to(ctx.x_dtype)
        if need_w and xs is not None:
            out_f = dy.shape[-1]
            if xs.kind == "rows":
                dy_rows = xs.gather_rows(dyf).reshape(-1, out_f)
                x_rows = xs.scaled_values().float().reshape(-1, xs.shape[-1])
            else:
                dy_rows = dyf.reshape(-1, out_f)
                x_rows = xs.dense(scaled=True).float().reshape(-1, xs.shape[-1])
            dw = x_rows.t() @ dy_rows if ctx.transposed else dy_rows.t() @ x_rows
            dw = dw.to(weight.dtype)
        if need_b and ctx.has_bias:
            db = dyf.reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, db, None, None, None
