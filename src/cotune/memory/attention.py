"""Attention core (scores, mask, softmax, dropout, weighted sum) as one function that
saves sparse operands.

Forward is the eager computation, op for op (bit-identical to transformers' eager path;
within float rounding of its SDPA path):

    S = Q K^T * scale + mask,   P = softmax(S),   Pd = dropout(P),   O = Pd V

Backward and what each gradient needs (every saved tensor keeps a subset of its token
rows; backrazor: of its elements):

    dV = Pd^T dO        sum over query rows  -> rows of P
    dPd = dO V^T        per key row          -> rows of V
    dS = P * (dP - rowsum(dP * P))           -> rows of P (query rows)
    dQ = dS K * scale   sum over key rows    -> rows of K
    dK = dS^T Q * scale sum over query rows  -> rows of Q

The dense attention matrix P is never kept: only its kept query rows. A dropped query row
of P gives that row zero logit gradient and no contribution to dV. With `random` +
`rescale` every linear use of a saved operand is weighted by 1 / P(kept) and the exact-or-
zero rows of dS likewise, so each factor is unbiased. The dropout mask is kept as bits,
and only where P is kept. `ops` decides coverage: "matmul" makes Q, K, V sparse,
"softmax" makes P sparse; an op left out is saved dense.

Transient memory (what a device's peak RSS sees, with checkpointing in the recompute):
the forward keeps at most two (B, H, L, L) tensors alive (softmax in place, P packed at
once, the dropout mask drawn as bools and applied in P's buffer), and with P saved as
rows the backward works on the k kept query rows only, never re-expanding P, Pd, dPd or
dS to (B, H, L, L). On minilm full fine-tuning (16 x 128, 12 heads, checkpoint + norm 0.1
+ step in backward) this took the attention region of a layer from about 54 to about 33
MiB above the layer's baseline and the step's peak RSS from 792 to 777-779 MiB.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cotune.memory.activation import dropout_keep
from cotune.memory.pack import Policy, SaveList, Sparse, pack, pack_dense, pack_positive

ATTN_NAME = "cotune_sparse"


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return t
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _sum_groups(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return t
    b, h, s, d = t.shape
    return t.view(b, h // n_rep, n_rep, s, d).sum(2)


def _softmax_in_place(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim of fp32 `scores`, written into `scores` (the kernel
    `nn.functional.softmax` runs, so the same values bit for bit)."""
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        add_mask: torch.Tensor | None,
        scaling: float,
        p: float,
        policy: Policy,
    ) -> torch.Tensor:
        n_rep = q.shape[1] // k.shape[1]
        kr, vr = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        qkv_policy = policy if "matmul" in policy.ops else None
        p_policy = policy if "softmax" in policy.ops else None
        saves = SaveList()
        saves.add(pack(q, qkv_policy))
        saves.add(pack(k, qkv_policy))
        saves.add(pack(v, qkv_policy))
        # The same values as eager with fewer (B, H, L, L) tensors alive (on a CPU, fresh
        # pages of that size also cost as much as the op itself): the scale, mask and
        # softmax work in place, P is packed as soon as it exists, the dropout mask is
        # drawn as bools (the same draws as eager's float mask) and applied in P's own
        # buffer. At most two such tensors are alive at once; eager holds P, the float
        # mask and P * mask together.
        scores = torch.matmul(q, kr.transpose(2, 3)).mul_(scaling)
        if add_mask is not None:
            scores = scores.add_(add_mask)
        if scores.dtype == v.dtype == torch.float32:
            probs = _softmax_in_place(scores)
        else:
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        del scores
        p_pack = pack(probs, p_policy) if p_policy is not None else pack_dense(probs)
        saves.add(p_pack)
        if p > 0:
            keep = dropout_keep(probs, p)
            # the dropout mask only where P is kept (elsewhere P, hence its gradient use,
            # is 0)
            saves.add(pack_positive(p_pack.select(keep).to(probs.dtype)))
            # P * mask * (1 / (1 - p)), as native_dropout computes it; in P's buffer when
            # the pack holds copies of what it keeps (rows, elements), not P itself (dense)
            weights = probs.mul_(keep) if p_pack.meta.kind != "dense" else probs * keep
            weights = weights.mul_(1.0 / (1.0 - p))
            del keep, probs
        else:
            saves.add(None)
            weights = probs
            del probs
        out = torch.matmul(weights, vr).transpose(1, 2).contiguous()
        del weights
        ctx.metas = saves.metas
        ctx.scaling = scaling
        ctx.p = p
        ctx.n_rep = n_rep
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.save_for_backward(*saves.tensors)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qs, ks, vs, ps, st = SaveList.restore(ctx.metas, ctx.saved_tensors)
        assert qs is not None and ks is not None and vs is not None and ps is not None
        n_rep, scaling, p = ctx.n_rep, ctx.scaling, ctx.p
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        d_o = dout.transpose(1, 2).float()
        d_q, d_k, d_v = _attention_backward(ps, qs, ks, vs, st, d_o, n_rep, scaling, p,
                                            kept_rows=ps.kind == "rows")  # fmt: skip
        return d_q.to(q_dtype), d_k.to(k_dtype), d_v.to(v_dtype), None, None, None, None


def _attention_backward(
    ps: Sparse,
    qs: Sparse,
    ks: Sparse,
    vs: Sparse,
    st: Sparse | None,
    d_o: torch.Tensor,
    n_rep: int,
    scaling: float,
    p: float,
    *,
    kept_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The formulas of the module docstring on the query rows P holds: all L of them
    (P rebuilt dense), or with `kept_rows` the k rows a rows pack kept (P's values as
    they are; dO and Q taken at those rows, dQ scattered back to L rows)."""
    probs = ps.values.float() if kept_rows else ps.dense().float()  # (B, H, R, L)
    # Pd = P * drop / (1 - p) is rebuilt from the kept entries of P times their dropout
    # bits (no dense dropout mask), and the softmax backward is written in terms of it:
    # dS = P * (dPd * drop / (1 - p) - rowsum(...)) = Pd * dPd - P * rowsum(Pd * dPd),
    # since dPd * drop / (1 - p) only meets P through Pd.
    if p > 0:
        assert st is not None
        kept_w = st.where_set(probs if kept_rows else ps.values.float()).mul_(1.0 / (1.0 - p))
        probs_d = kept_w if kept_rows else ps.place(kept_w)
        del kept_w
    else:
        probs_d = probs
    row_scale = ps.row_scale()  # (B, H, 1, 1) or None
    d_o_rows = ps.gather_rows(d_o) if kept_rows else d_o  # (B, H, R, D)
    probs_w = probs_d if row_scale is None else probs_d * row_scale.float()
    d_v = _sum_groups(probs_w.transpose(2, 3) @ d_o_rows, n_rep)
    del probs_w
    v_w = _repeat_kv(vs.dense(scaled=True).float(), n_rep)
    d_p = d_o_rows @ v_w.transpose(2, 3)  # (B, H, R, L)
    del v_w, d_o_rows
    d_p = d_p.mul_(probs_d)
    d_s = d_p.addcmul_(probs, d_p.sum(-1, keepdim=True), value=-1.0)
    del d_p, probs, probs_d
    if row_scale is not None:
        d_s = d_s.mul_(row_scale.float())
    # the softmax scale is applied to dQ and dK, which are L / head_dim times smaller
    k_w = _repeat_kv(ks.dense(scaled=True).float(), n_rep)
    d_q = (d_s @ k_w).mul_(scaling)
    if kept_rows:
        d_q = ps.scatter_rows(d_q, d_q.new_zeros(d_o.shape))
    q_w = qs.dense(scaled=True).float()
    d_k = _sum_groups(d_s.transpose(2, 3) @ (ps.gather_rows(q_w) if kept_rows else q_w), n_rep)
    return d_q, d_k.mul_(scaling), d_v


def _additive_mask(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool | None,
) -> torch.Tensor | None:
    """The mask as eager attention adds it: SDPA-style bool masks and `None` + causal are
    turned into additive float masks."""
    q_len, k_len = query.shape[2], key.shape[2]
    min_value = torch.finfo(query.dtype).min
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        if not causal or q_len == 1:
            return None
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
        attention_mask = allowed[None, None]
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        return torch.where(attention_mask, zero, min_value)
    return attention_mask[..., :k_len]


def stock_attention(module: nn.Module) -> Callable[..., Any]:
    """The attention function the module used before it was patched."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module, "_cotune_stock_attn", None)
    if name in (None, "eager"):
        return type(module).forward.__globals__["eager_attention_forward"]
    return ALL_ATTENTION_FUNCTIONS[name]


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention interface (registered as "cotune_sparse")."""
    policy: Policy | None = getattr(module, "_cotune_policy", None)
    needs_grad = query.requires_grad or key.requires_grad or value.requires_grad
    if policy is None or not torch.is_grad_enabled() or not needs_grad:
        return stock_attention(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    for unsupported in ("softcap", "sliding_window", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"memory.backward: sparse attention does not support {unsupported!r}; "
                "leave 'matmul' and 'softmax' out of memory.ops for this model"
            )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    add_mask = _additive_mask(module, query, key, attention_mask, kwargs.get("is_causal"))
    out = SparseAttentionFunction.apply(
        query, key, value, add_mask, float(scaling), float(dropout), policy
    )
    return out, None


def register() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_NAME, sparse_attention_forward)
