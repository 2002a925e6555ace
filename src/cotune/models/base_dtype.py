"""A low-memory frozen base: frozen Linear weights and embeddings stored in bf16 or int8.

Under LoRA the base model does not train, yet a device keeps every weight of it in fp32.
`apply_base_dtype(model, "bf16" | "int8")` replaces, in place, every `nn.Linear` (and
GPT-2 `Conv1D`) whose weight is frozen and not shared with another module (an LM head
tied to the embeddings is shared: it stays as it is) by a `FrozenLinear` that stores

- "bf16": the weight as bfloat16 (2 bytes per weight);
- "int8": the weight as int8 with one fp32 scale per output channel (symmetric absmax:
  `scale = max|W[o, :]| / 127`, `W[o, i] ~= q[o, i] * scale[o]`), 1 byte per weight.

Embedding tables (`nn.Embedding`: token, position, token-type) that are frozen and not
tied to an LM head become `FrozenEmbedding`s stored the same way (int8: one scale per
row, i.e. per token); a lookup dequantizes only the rows it reads, and no gradient flows
into a frozen table. A table tied to the LM head (GPT-2, tiny-llama) stays fp32 with it
(a split device's segment holds the table alone and stores it: `cotune.models.cut.store_base`).
The trainable tensors (LoRA A/B, the head, biases left trainable) are untouched and stay
fp32; so do norms and other parameters (ViT's patch projection and position vector).
Training runs through the stored base: the forward
is `F.linear(x, W_hat, b)` with `W_hat` the dequantized weight, built in the activations'
dtype for the op and freed after it, and the backward returns the exact input gradient
`dy @ W_hat` (so the LoRA layers below get the gradient of the model whose base is
`W_hat`), dequantizing again from the stored weight. Autograd saves only the stored
int8 / bf16 weight (and scales) for backward, never an fp32 copy; a frozen weight needs
no saved input at all.

Why not a quantized kernel: torch's CPU weight-only kernel `torch._weight_int8pack_mm`
takes fp32 activations but ran ~30x slower than the fp32 matmul here (it is fast only with
bf16 activations, which would round every activation); torchao's `Int8WeightOnlyConfig`
with peft's torchao LoRA layer trains correctly on CPU but adds a dependency, covers
`nn.Linear` only (not GPT-2's `Conv1D`, not bf16 storage) and was no faster than
dequantizing per op. Dequantize-then-`F.linear` uses torch's own GEMM and is exact with
respect to `W_hat`. See docs/memory.md ("A low-memory frozen base").
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from cotune.errors import ModelError

BaseDtype = Literal["fp32", "bf16", "int8"]
BASE_DTYPES: tuple[BaseDtype, ...] = ("fp32", "bf16", "int8")
INT8_MAX = 127


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q, scale): symmetric per-output-channel (row) int8 of a [out, in] weight, with
    `q * scale[:, None]` the dequantized weight; a zero row gets scale 1 (q = 0)."""
    w = weight.detach().float()
    amax = torch.maximum(w.amax(dim=1), -w.amin(dim=1))  # no |w| temporary
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    t = w / scale[:, None]  # the one full-size fp32 temporary
    q = t.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize(stored: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The weight `stored` ([out, in], bf16 or int8) represents, as `dtype`; int8 is
    scaled in fp32 (one rounding to `dtype` at the end, as autocast would do)."""
    if scale is None:
        return stored.to(dtype)
    w = torch.mul(stored, scale[:, None])  # int8 * fp32 -> fp32, one temporary
    return w if w.dtype == dtype else w.to(dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmul runs in: autocast's when it is on, else the input's."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class FrozenLinearFunction(torch.autograd.Function):
    """y = x W_hat^T + b; saves only the stored weight (and scales), no activation."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, stored: Tensor, scale: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        w = dequantize(stored, scale, _compute_dtype(x))
        y = F.linear(x, w, bias)
        del w
        ctx.save_for_backward(stored, scale)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        stored, scale = ctx.saved_tensors
        need_x, _, _, need_b = ctx.needs_input_grad
        dx = db = None
        if need_x:
            dx = (dy @ dequantize(stored, scale, dy.dtype)).to(ctx.x_dtype)
        if need_b:  # a bias left trainable; in its own dtype (autocast ran it in dy's)
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, None, db


class FrozenLinear(nn.Module):
    """A Linear layer whose frozen weight is stored in bf16 or int8 (see the module doc).

    The stored weight is the buffer `stored_weight` ([out, in], like `nn.Linear.weight`,
    also for a converted `Conv1D`), with `weight_scale` ([out], fp32) for int8. There is
    deliberately no `.weight`: code that would read or cast it gets an AttributeError
    rather than an int8 tensor; `dequantized_weight()` gives the fp32 weight.
    """

    stored_weight: Tensor
    weight_scale: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None, base_dtype: BaseDtype) -> None:
        super().__init__()
        if base_dtype not in ("bf16", "int8"):
            raise ModelError(f"FrozenLinear stores bf16 or int8, not {base_dtype!r}")
        self.base_dtype = base_dtype
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if base_dtype == "int8":
            q, scale = quantize_int8(weight)
            self.register_buffer("stored_weight", q)
            self.register_buffer("weight_scale", scale)
        else:
            self.register_buffer("stored_weight", weight.detach().to(torch.bfloat16).contiguous())
            self.register_buffer("weight_scale", None)
        # the bias keeps its name, dtype and requires_grad (frozen under LoRA)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), bias.requires_grad)
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """A fresh [out, in] copy of the weight this layer computes with."""
        return dequantize(self.stored_weight, self.weight_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        if torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)
        ):
            out: Tensor = FrozenLinearFunction.apply(x, self.stored_weight, self.weight_scale, bias)
            return out
        return F.linear(
            x, dequantize(self.stored_weight, self.weight_scale, _compute_dtype(x)), bias
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, base_dtype={self.base_dtype}"
        )


class FrozenEmbedding(nn.Module):
    """An embedding table stored in bf16 or int8 (one fp32 scale per row); the lookup
    returns fp32 rows (the activations' dtype). Frozen: nothing flows back into it.

    Like `FrozenLinear` it has no `.weight`; `dequantized_weight()` gives the fp32 table.
    """

    stored_weight: Tensor
    weight_scale: Tensor | None

    def __init__(self, embedding: nn.Embedding, base_dtype: BaseDtype) -> None:
        super().__init__()
        if base_dtype not in ("bf16", "int8"):
            raise ModelError(f"FrozenEmbedding stores bf16 or int8, not {base_dtype!r}")
        if embedding.max_norm is not None:
            raise ModelError("an embedding with max_norm renormalises its table: keep it fp32")
        self.base_dtype = base_dtype
        self.num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.out_dtype = embedding.weight.dtype
        if base_dtype == "int8":
            q, scale = quantize_int8(embedding.weight)
            self.register_buffer("stored_weight", q)
            self.register_buffer("weight_scale", scale)
        else:
            stored = embedding.weight.detach().to(torch.bfloat16).contiguous()
            self.register_buffer("stored_weight", stored)
            self.register_buffer("weight_scale", None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """A fresh [num_embeddings, embedding_dim] copy of the table this module reads."""
        return dequantize(self.stored_weight, self.weight_scale, dtype)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.stored_weight)
        if self.weight_scale is None:
            return rows.to(self.out_dtype)
        return (rows * F.embedding(ids, self.weight_scale[:, None])).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, base_dtype={self.base_dtype}"


def _stock_class(module: nn.Module) -> type:
    # a module the memory option swapped remembers its stock class
    cls: type = getattr(module, "_cotune_stock_cls", type(module))
    return cls


def _linear_weight(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(weight as [out, in], the weight parameter itself) of a stock Linear / Conv1D
    (or one the memory option swapped), else None."""
    from transformers.pytorch_utils import Conv1D

    cls = _stock_class(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    if issubclass(cls, nn.Linear) and cls.forward is nn.Linear.forward:
        return weight, weight
    if cls is Conv1D:
        return weight.t(), weight  # Conv1D stores [in, out]
    return None


def apply_base_dtype(model: nn.Module, base_dtype: BaseDtype) -> nn.Module:
    """Store the frozen Linear / Conv1D weights and embedding tables of `model` in
    `base_dtype`, in place.

    "fp32" leaves `model` untouched. Call it after LoRA wrapping (peft's LoRA layers
    need the stock Linear to wrap) and before the memory option; parameters that train
    are never touched, so what an optimiser, a checkpoint or federated averaging sees
    (the trainable tensors) is unchanged. Raises ModelError if `model` has no frozen,
    unshared Linear (e.g. full fine-tuning: an int8 weight cannot train).
    """
    if base_dtype == "fp32":
        return model
    if base_dtype not in BASE_DTYPES:
        raise ModelError(
            f"model.base_dtype {base_dtype!r} is not valid; valid: {', '.join(BASE_DTYPES)}"
        )
    # how many modules hold each parameter directly: a weight held twice is tied
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    new: dict[int, nn.Module] = {}
    for m in model.modules():
        if type(m) is nn.Embedding:
            if not m.weight.requires_grad and holders.get(id(m.weight), 0) == 1:
                new[id(m)] = FrozenEmbedding(m, base_dtype)
            continue
        found = _linear_weight(m)
        if found is None:
            continue
        weight, param = found
        bias = getattr(m, "bias", None)
        if param.requires_grad or holders.get(id(param), 0) > 1:
            continue
        new[id(m)] = FrozenLinear(weight, bias if isinstance(bias, Tensor) else None, base_dtype)
    if not any(isinstance(m, FrozenLinear) for m in new.values()):
        raise ModelError(
            f"model.base_dtype = {base_dtype!r} found no frozen Linear layer to store in "
            f"{base_dtype}: it applies to the frozen base under LoRA (set [model.lora]), "
            "or use model.base_dtype = 'fp32'"
        )
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                parent._modules[name] = new[id(child)]
    _own_storage(model)
    return model


def _own_storage(model: nn.Module) -> None:
    """Give the frozen tensors left in fp32 (norms, biases, tables tied to the LM head or
    kept in an nn.Embedding) a storage of their own. transformers loads a checkpoint as
    tensors over one memory-mapped file, which stays mapped while any of them lives, and
    every page that quantizing read stays resident: 86 MiB for minilm, and for a
    SmolLM2-135M split device, whose tied table kept the file mapped, 405 MiB of the
    whole model's weights after it had kept only its segment. A copy of a large table
    costs its size for a moment; the file's pages go when the last tensor over them does.
    A tied table is one Parameter held twice: replacing its data keeps the tie."""
    with torch.no_grad():
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None and not p.requires_grad:
                    p.data = p.data.clone()
            for key, b in list(m._buffers.items()):
                if b is not None and not isinstance(m, (FrozenLinear, FrozenEmbedding)):
                    m._buffers[key] = b.clone()


def frozen_linear_count(model: nn.Module) -> int:
    """How many Linear layers of `model` hold a bf16 / int8 frozen weight."""
    return sum(isinstance(m, FrozenLinear) for m in model.modules())


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers `modules` hold (what a device stores
    of the model: frozen base, adapters, head, embeddings, norms and their buffers)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
