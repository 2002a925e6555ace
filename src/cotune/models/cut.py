"""Cutting a classifier into a device segment and a cloud segment (and a U-shaped head).

`cut_classifier(model, cut, labels=..., sft_rank=...)` takes a `SequenceClassifier`
(peft-wrapped or not) and returns a `SplitClassifier` of three modules built from the
model's own submodules (no copies, no re-implementation of the layers):

- `device`: the embeddings and layers `< cut`: raw inputs (token ids, pixels) never
  leave it. `device(**inputs)` returns the activations at the cut ([B, L, width]) and
  the padding mask ([B, L], None for images).
- `cloud`: layers `>= cut`, the final norm and the pooling; `cloud(hidden, mask)`
  returns pooled features [B, hidden] (a `SpanExtractor`'s cloud does not pool: it
  returns the hidden states of every token, [B, L, hidden]).
- `head`: dropout + linear head + loss (`SequenceClassifier.classify`; a
  `SpanExtractor`'s `span`, start/end logits per token). `head(features, labels, mask)`
  runs on the cloud with `labels="cloud"`, on the device with `labels="device"`
  (U-shaped: labels never leave the device; the cloud's output comes down, its gradient
  goes up).

Each side rebuilds what the layers need from the mask it has (attention masks through
transformers' own `create_*_mask`, Llama's rotary embeddings, position ids), so running
`head(cloud(*device(x)))` is the unsplit model's computation, op for op.

With `sft_rank=r` the cut is inside layer `cut` (SFT, split fine-tuning): that layer's
first FFN matrix W (d_ff x d, for Llama gate and up stacked) is replaced by its truncated
SVD as three trainable maps V_r (r x d), diag(S_r), U_r (d_ff x r, W's bias). The device
computes layers `< cut`, layer `cut`'s attention block, then S_r V_r: an r-dim code per
token. The cloud computes U_r, the activation, the FFN output projection (dropout,
LayerNorm for post-norm models) without the FFN residual, then layers `> cut`.

Family support: bert, roberta, distilbert (post-norm encoders), llama, gemma3, gpt2
(decoders), vit, dinov2 (image encoders: the device holds the patch embedding, so raw
pixels never leave it). Valid cuts: 1 <= cut < number of layers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from cotune.errors import ModelError
from cotune.models.base_dtype import BaseDtype, FrozenLinear, apply_base_dtype
from cotune.models.classifier import SequenceClassifier
from cotune.models.lora import unwrap
from cotune.models.span import SpanExtractor, SpanOutput


@functools.cache
def _cache_kw(fn: Callable[..., Any]) -> str:
    """The name `fn` takes the KV cache under: `cache` from transformers 5.24 on (which
    deprecates `past_key_values`, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _with_cache(fn: Callable[..., Any], cache: Any) -> dict[str, Any]:
    return {_cache_kw(getattr(fn, "__func__", fn)): cache}


Labels = Literal["cloud", "device"]
Ctx = dict[str, Any]

# A transformers base model, or one of its layers or blocks, reached through the attribute
# names of its family's layout (`backbone.encoder.layer`, `layer.mlp.gate_proj`, ...).
# Several architectures share one layout (mistral and qwen2 run as llama), so no one class
# describes it, and nn.Module's `__getattr__` types every such attribute `Tensor | Module`.
HFModule = Any


# ----------------------------------------------------------------------------- families


class _Family:
    """How one model family's base model runs, piece by piece."""

    name = ""
    causal = False

    # embeddings -------------------------------------------------------------
    def embed_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        raise NotImplementedError

    def embed(self, m: nn.ModuleDict, inputs: dict[str, Tensor | None]) -> Tensor:
        raise NotImplementedError

    # layers -----------------------------------------------------------------
    def layers(self, backbone: HFModule) -> nn.ModuleList:
        raise NotImplementedError

    def shared_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        """Parameter-free modules both sides need (e.g. rotary embeddings)."""
        return {}

    def context(
        self, config: Any, shared: nn.ModuleDict, hidden: Tensor, mask: Tensor | None
    ) -> Ctx:
        make = create_causal_mask if self.causal else create_bidirectional_mask
        if self.causal:
            # Called with default arguments (as SequenceClassifier does), the HF decoders
            # build a fresh KV cache when config.use_cache; the cache changes which
            # attention kernel runs, so each side does the same to stay op-for-op equal.
            cache = DynamicCache(config=config) if getattr(config, "use_cache", False) else None
            pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            attn = make(
                config=config, inputs_embeds=hidden, attention_mask=mask, position_ids=pos,
                **_with_cache(make, cache),
            )  # fmt: skip
            return {"mask": attn, "position_ids": pos, "cache": cache}
        return {"mask": make(config=config, inputs_embeds=hidden, attention_mask=mask)}

    def run_layer(self, layer: nn.Module, hidden: Tensor, ctx: Ctx) -> Tensor:
        return layer(hidden, ctx["mask"])

    # final norm ---------------------------------------------------------------
    def final_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {}

    def final(self, m: nn.ModuleDict, hidden: Tensor) -> Tensor:
        return hidden

    # SFT: the cut layer split inside its FFN ----------------------------------
    def sft_device_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        raise NotImplementedError

    def sft_pre_ffn(self, m: nn.ModuleDict, hidden: Tensor, ctx: Ctx) -> Tensor:
        """Layer `cut` up to the FFN's input (attention block, its residual and norms)."""
        raise NotImplementedError

    def sft_ffn_in(self, layer: HFModule) -> tuple[Tensor, Tensor | None]:
        """The first FFN matrix as (weight [d_ff, d], bias [d_ff] or None)."""
        raise NotImplementedError

    def sft_cloud_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        raise NotImplementedError

    def sft_post_ffn(self, m: nn.ModuleDict, u: Tensor) -> Tensor:
        """From the FFN's pre-activation to the layer output, without the FFN residual."""
        raise NotImplementedError


def _from_weight(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding copies of `weight` ([out, in]) and `bias`."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _linear(module: nn.Module, where: str) -> nn.Linear:
    """The matrix `module` computes with, as a plain `nn.Linear` ([out, in]) for SFT to
    factorise: a bf16 / int8 base de-quantised, a LoRA-wrapped one with its adapters'
    delta added (the trainable factors then replace both; the adapters of this one
    matrix take no further part)."""
    if isinstance(module, LoraLayer):
        plain = _linear(module.get_base_layer(), where)
        weight, bias = plain.weight, plain.bias
        # peft gives the delta as [in, out] under fan_in_fan_out (GPT-2's layout), even
        # when an int8 / bf16 base replaced the Conv1D
        transposed = bool(getattr(module, "fan_in_fan_out", False))
        with torch.no_grad():
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter)  # type: ignore[operator]
                    weight = weight + (delta.T if transposed else delta)
        return _from_weight(weight, bias)
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return _from_weight(module.weight.T, module.bias)  # type: ignore[arg-type]
    if isinstance(module, FrozenLinear):
        # a bf16 / int8 base (model.base_dtype): SFT factorises the weight it computes with
        return _from_weight(module.dequantized_weight(), module.bias)
    if type(module) is not nn.Linear:
        raise ModelError(
            f"split with link.codec = 'sft' factorises {where}, which is a "
            f"{type(module).__name__} here, not a linear layer (plain, LoRA-wrapped or "
            "in model.base_dtype); use another codec"
        )
    return module


def _act(fn: Any) -> nn.Module:
    """Activation functions as modules (ACT2FN gives modules; configs may give callables)."""
    return fn if isinstance(fn, nn.Module) else _Lambda(fn)


class _Lambda(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class _Bert(_Family):
    name = "bert"

    def embed_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"embeddings": backbone.embeddings}

    def embed(self, m: nn.ModuleDict, inputs: dict[str, Tensor | None]) -> Tensor:
        return m["embeddings"](
            input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids")
        )

    def layers(self, backbone: HFModule) -> nn.ModuleList:
        return backbone.encoder.layer

    def sft_device_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {"attention": layer.attention}

    def sft_pre_ffn(self, m: nn.ModuleDict, hidden: Tensor, ctx: Ctx) -> Tensor:
        return m["attention"](hidden, ctx["mask"])[0]

    def sft_ffn_in(self, layer: HFModule) -> tuple[Tensor, Tensor | None]:
        lin = _linear(layer.intermediate.dense, "intermediate.dense")
        return lin.weight, lin.bias

    def sft_cloud_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {"act": _act(layer.intermediate.intermediate_act_fn), "output": layer.output}

    def sft_post_ffn(self, m: nn.ModuleDict, u: Tensor) -> Tensor:
        out: HFModule = m["output"]
        return out.LayerNorm(out.dropout(out.dense(m["act"](u))))


class _DistilBert(_Family):
    name = "distilbert"

    def embed_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"embeddings": backbone.embeddings}

    def embed(self, m: nn.ModuleDict, inputs: dict[str, Tensor | None]) -> Tensor:
        return m["embeddings"](inputs["input_ids"], None, None)

    def layers(self, backbone: HFModule) -> nn.ModuleList:
        return backbone.transformer.layer

    def sft_device_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {"attention": layer.attention, "sa_layer_norm": layer.sa_layer_norm}

    def sft_pre_ffn(self, m: nn.ModuleDict, hidden: Tensor, ctx: Ctx) -> Tensor:
        attn = m["attention"](hidden, attention_mask=ctx["mask"])[0]
        return m["sa_layer_norm"](attn + hidden)

    def sft_ffn_in(self, layer: HFModule) -> tuple[Tensor, Tensor | None]:
        lin = _linear(layer.ffn.lin1, "ffn.lin1")
        return lin.weight, lin.bias

    def sft_cloud_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {
            "act": _act(layer.ffn.activation),
            "lin2": layer.ffn.lin2,
            "dropout": layer.ffn.dropout,
            "output_layer_norm": layer.output_layer_norm,
        }

    def sft_post_ffn(self, m: nn.ModuleDict, u: Tensor) -> Tensor:
        return m["output_layer_norm"](m["dropout"](m["lin2"](m["act"](u))))


class _Llama(_Family):
    name = "llama"
    causal = True

    def embed_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"embed_tokens": backbone.embed_tokens}

    def embed(self, m: nn.ModuleDict, inputs: dict[str, Tensor | None]) -> Tensor:
        return m["embed_tokens"](inputs["input_ids"])

    def layers(self, backbone: HFModule) -> nn.ModuleList:
        return backbone.layers

    def shared_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"rotary_emb": backbone.rotary_emb}

    def context(
        self, config: Any, shared: nn.ModuleDict, hidden: Tensor, mask: Tensor | None
    ) -> Ctx:
        ctx = super().context(config, shared, hidden, mask)
        ctx["position_embeddings"] = shared["rotary_emb"](hidden, position_ids=ctx["position_ids"])
        return ctx

    def run_layer(self, layer: nn.Module, hidden: Tensor, ctx: Ctx) -> Tensor:
        return layer(
            hidden, attention_mask=ctx["mask"], position_embeddings=ctx["position_embeddings"],
            position_ids=ctx["position_ids"], use_cache=ctx["cache"] is not None,
            **_with_cache(type(layer).forward, ctx["cache"]),
        )  # fmt: skip

    def final_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"norm": backbone.norm}

    def final(self, m: nn.ModuleDict, hidden: Tensor) -> Tensor:
        return m["norm"](hidden)

    def sft_device_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {
            "input_layernorm": layer.input_layernorm,
            "self_attn": layer.self_attn,
            "post_attention_layernorm": layer.post_attention_layernorm,
        }

    def sft_pre_ffn(self, m: nn.ModuleDict, hidden: Tensor, ctx: Ctx) -> Tensor:
        attn = m["self_attn"](
            hidden_states=m["input_layernorm"](hidden), attention_mask=ctx["mask"],
            position_ids=ctx["position_ids"], position_embeddings=ctx["position_embeddings"],
            use_cache=ctx["cache"] is not None,
            **_with_cache(type(m["self_attn"]).forward, ctx["cache"]),
        )[0]  # fmt: skip
        return m["post_attention_layernorm"](hidden + attn)

    def sft_ffn_in(self, layer: HFModule) -> tuple[Tensor, Tensor | None]:
        gate = _linear(layer.mlp.gate_proj, "mlp.gate_proj")
        up = _linear(layer.mlp.up_proj, "mlp.up_proj")
        bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])
        return torch.cat([gate.weight, up.weight]), bias

    def sft_cloud_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {"act": _act(layer.mlp.act_fn), "down_proj": layer.mlp.down_proj}

    def sft_post_ffn(self, m: nn.ModuleDict, u: Tensor) -> Tensor:
        gate, up = u.chunk(2, dim=-1)
        return m["down_proj"](m["act"](gate) * up)


class _Gemma3(_Llama):
    """Gemma 3: Llama's layout plus what `Gemma3TextModel.forward` adds. The embedding
    module scales by sqrt(hidden) itself; layers alternate sliding-window (local rotary
    base) and global attention (global base), so the context holds a mask and rotary
    embeddings per layer type and each layer takes those of its type; each layer has
    four norms (before/after attention, before/after the FFN; q/k norms are inside the
    attention module)."""

    name = "gemma3"

    def context(
        self, config: Any, shared: nn.ModuleDict, hidden: Tensor, mask: Tensor | None
    ) -> Ctx:
        if getattr(config, "use_bidirectional_attention", False):
            raise ModelError("cannot cut a Gemma 3 model with use_bidirectional_attention")
        ctx = _Family.context(self, config, shared, hidden, mask)  # the global causal mask
        make = create_sliding_window_causal_mask
        sliding = make(
            config=config, inputs_embeds=hidden, attention_mask=mask,
            position_ids=ctx["position_ids"], **_with_cache(make, ctx["cache"]),
        )  # fmt: skip
        ctx["masks"] = {"full_attention": ctx["mask"], "sliding_attention": sliding}
        ctx["rotary"] = {
            kind: shared["rotary_emb"](hidden, ctx["position_ids"], kind)
            for kind in set(config.layer_types)
        }
        ctx["layer_types"] = config.layer_types
        return ctx

    def _of(self, attn: HFModule, ctx: Ctx) -> tuple[Any, Any]:
        """The mask and rotary embeddings for the layer whose attention module is `attn`."""
        kind = ctx["layer_types"][attn.layer_idx]
        return ctx["masks"][kind], ctx["rotary"][kind]

    def run_layer(self, layer: nn.Module, hidden: Tensor, ctx: Ctx) -> Tensor:
        mask, rotary = self._of(layer.self_attn, ctx)
        return layer(
            hidden, attention_mask=mask, position_embeddings=rotary,
            position_ids=ctx["position_ids"], **_with_cache(type(layer).forward, ctx["cache"]),
        )  # fmt: skip

    def sft_device_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {
            **super().sft_device_modules(layer),
            "pre_feedforward_layernorm": layer.pre_feedforward_layernorm,
        }

    def sft_pre_ffn(self, m: nn.ModuleDict, hidden: Tensor, ctx: Ctx) -> Tensor:
        attn_mod: HFModule = m["self_attn"]
        mask, rotary = self._of(attn_mod, ctx)
        attn = attn_mod(
            hidden_states=m["input_layernorm"](hidden), attention_mask=mask,
            position_ids=ctx["position_ids"], position_embeddings=rotary,
            **_with_cache(type(attn_mod).forward, ctx["cache"]),
        )[0]  # fmt: skip
        return m["pre_feedforward_layernorm"](hidden + m["post_attention_layernorm"](attn))

    def sft_cloud_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {
            **super().sft_cloud_modules(layer),
            "post_feedforward_layernorm": layer.post_feedforward_layernorm,
        }

    def sft_post_ffn(self, m: nn.ModuleDict, u: Tensor) -> Tensor:
        return m["post_feedforward_layernorm"](super().sft_post_ffn(m, u))


class _Gpt2(_Family):
    name = "gpt2"
    causal = True

    def embed_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"wte": backbone.wte, "wpe": backbone.wpe, "drop": backbone.drop}

    def embed(self, m: nn.ModuleDict, inputs: dict[str, Tensor | None]) -> Tensor:
        ids = inputs["input_ids"]
        assert ids is not None
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return m["drop"](m["wte"](ids) + m["wpe"](pos))

    def layers(self, backbone: HFModule) -> nn.ModuleList:
        return backbone.h

    def run_layer(self, layer: nn.Module, hidden: Tensor, ctx: Ctx) -> Tensor:
        # the cache by keyword: a checkpointed layer (memory.checkpoint) drops a cache
        # given by keyword, which its recomputation in backward would write a second time
        return layer(
            hidden, attention_mask=ctx["mask"], encoder_hidden_states=None,
            encoder_attention_mask=None, use_cache=ctx["cache"] is not None,
            position_ids=ctx["position_ids"], **_with_cache(type(layer).forward, ctx["cache"]),
        )  # fmt: skip

    def final_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"ln_f": backbone.ln_f}

    def final(self, m: nn.ModuleDict, hidden: Tensor) -> Tensor:
        return m["ln_f"](hidden)

    def sft_device_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {"ln_1": layer.ln_1, "attn": layer.attn, "ln_2": layer.ln_2}

    def sft_pre_ffn(self, m: nn.ModuleDict, hidden: Tensor, ctx: Ctx) -> Tensor:
        attn = m["attn"](
            m["ln_1"](hidden),
            **_with_cache(type(m["attn"]).forward, ctx["cache"]),
            attention_mask=ctx["mask"],
            use_cache=ctx["cache"] is not None,
        )[0]
        return m["ln_2"](attn + hidden)

    def sft_ffn_in(self, layer: HFModule) -> tuple[Tensor, Tensor | None]:
        lin = _linear(layer.mlp.c_fc, "mlp.c_fc")  # Conv1D, LoRA-wrapped or low-precision
        return lin.weight, lin.bias

    def sft_cloud_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        mlp = layer.mlp
        return {"act": _act(mlp.act), "c_proj": mlp.c_proj, "dropout": mlp.dropout}

    def sft_post_ffn(self, m: nn.ModuleDict, u: Tensor) -> Tensor:
        return m["dropout"](m["c_proj"](m["act"](u)))


class _Vit(_Family):
    name = "vit"

    def embed_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"embeddings": backbone.embeddings}

    def embed(self, m: nn.ModuleDict, inputs: dict[str, Tensor | None]) -> Tensor:
        pixels = inputs["pixel_values"]
        assert pixels is not None
        emb: HFModule = m["embeddings"]
        pixels = pixels.to(emb.patch_embeddings.projection.weight.dtype)
        return emb(pixels, bool_masked_pos=None, interpolate_pos_encoding=None)

    def layers(self, backbone: HFModule) -> nn.ModuleList:
        return backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer

    def final_modules(self, backbone: HFModule) -> dict[str, nn.Module]:
        return {"layernorm": backbone.layernorm}

    def final(self, m: nn.ModuleDict, hidden: Tensor) -> Tensor:
        return m["layernorm"](hidden)

    def sft_device_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {
            "layernorm_before": layer.layernorm_before,
            "attention": layer.attention,
            "dropout": layer.dropout,
            "layernorm_after": layer.layernorm_after,
        }

    def sft_pre_ffn(self, m: nn.ModuleDict, hidden: Tensor, ctx: Ctx) -> Tensor:
        attn = m["attention"](m["layernorm_before"](hidden), ctx["mask"])[0]
        return m["layernorm_after"](m["dropout"](attn) + hidden)

    def sft_ffn_in(self, layer: HFModule) -> tuple[Tensor, Tensor | None]:
        lin = _linear(layer.mlp.fc1, "mlp.fc1")
        return lin.weight, lin.bias

    def sft_cloud_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        mlp = layer.mlp
        return {"act": _act(mlp.activation_fn), "fc2": mlp.fc2, "dropout": layer.dropout}

    def sft_post_ffn(self, m: nn.ModuleDict, u: Tensor) -> Tensor:
        return m["dropout"](m["fc2"](m["act"](u)))


class _Dinov2(_Vit):
    """DINOv2: ViT's embeddings and final layernorm; pre-norm layers with layer scale,
    position embeddings interpolated to the image's patch grid inside the embeddings."""

    name = "dinov2"

    def embed(self, m: nn.ModuleDict, inputs: dict[str, Tensor | None]) -> Tensor:
        pixels = inputs["pixel_values"]
        assert pixels is not None
        emb: HFModule = m["embeddings"]
        return emb(pixels, bool_masked_pos=None)

    def layers(self, backbone: HFModule) -> nn.ModuleList:
        return backbone.encoder.layer

    def sft_device_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {
            "norm1": layer.norm1,
            "attention": layer.attention,
            "layer_scale1": layer.layer_scale1,
            "drop_path": layer.drop_path,
            "norm2": layer.norm2,
        }

    def sft_pre_ffn(self, m: nn.ModuleDict, hidden: Tensor, ctx: Ctx) -> Tensor:
        attn = m["attention"](m["norm1"](hidden), attention_mask=ctx["mask"])[0]
        return m["norm2"](m["drop_path"](m["layer_scale1"](attn)) + hidden)

    def sft_ffn_in(self, layer: HFModule) -> tuple[Tensor, Tensor | None]:
        lin = _linear(layer.mlp.fc1, "mlp.fc1")
        return lin.weight, lin.bias

    def sft_cloud_modules(self, layer: HFModule) -> dict[str, nn.Module]:
        return {
            "act": _act(layer.mlp.activation_fn),
            "fc2": layer.mlp.fc2,
            "layer_scale2": layer.layer_scale2,
            "drop_path": layer.drop_path,
        }

    def sft_post_ffn(self, m: nn.ModuleDict, u: Tensor) -> Tensor:
        return m["drop_path"](m["layer_scale2"](m["fc2"](m["act"](u))))


FAMILY_OPS: dict[str, _Family] = {
    "bert": _Bert(),
    "roberta": _Bert(),
    "distilbert": _DistilBert(),
    "llama": _Llama(),
    "gemma3": _Gemma3(),
    "gpt2": _Gpt2(),
    "vit": _Vit(),
    "dinov2": _Dinov2(),
}


# ----------------------------------------------------------------------------- SFT


class SftFactors(nn.Module):
    """W (d_ff x d) ~= U_r diag(S_r) V_r: the truncated SVD, as trainable parameters."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rank: int) -> None:
        super().__init__()
        d_ff, d = weight.shape
        if not 1 <= rank <= min(d_ff, d):
            raise ModelError(f"link.rank for sft must be in [1, {min(d_ff, d)}], got {rank}")
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
        dtype = weight.dtype
        self.V = nn.Parameter(vh[:rank].to(dtype).contiguous())  # [r, d]
        self.S = nn.Parameter(s[:rank].to(dtype).contiguous())  # [r]
        self.U = nn.Parameter(u[:, :rank].to(dtype).contiguous())  # [d_ff, r]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def encode(self, z: Tensor) -> Tensor:
        """Device half: the r-dim code S_r * (V_r z)."""
        return nn.functional.linear(z, self.V) * self.S

    def decode(self, code: Tensor) -> Tensor:
        """Cloud half: U_r code + b, the FFN's pre-activation."""
        return nn.functional.linear(code, self.U, self.bias)


class _SftDeviceHalf(nn.Module):
    def __init__(self, family: _Family, layer: nn.Module, factors: SftFactors) -> None:
        super().__init__()
        self.family = family
        self.parts = nn.ModuleDict(family.sft_device_modules(layer))
        self.V = nn.Parameter(factors.V.data)
        self.S = nn.Parameter(factors.S.data)

    def forward(self, hidden: Tensor, ctx: Ctx) -> Tensor:
        z = self.family.sft_pre_ffn(self.parts, hidden, ctx)
        return nn.functional.linear(z, self.V) * self.S


class _SftCloudHalf(nn.Module):
    def __init__(self, family: _Family, layer: nn.Module, factors: SftFactors) -> None:
        super().__init__()
        self.family = family
        self.parts = nn.ModuleDict(family.sft_cloud_modules(layer))
        self.U = nn.Parameter(factors.U.data)
        self.bias = None if factors.bias is None else nn.Parameter(factors.bias.data)

    def forward(self, code: Tensor) -> Tensor:
        return self.family.sft_post_ffn(self.parts, nn.functional.linear(code, self.U, self.bias))


# ----------------------------------------------------------------------------- segments


class DeviceSegment(nn.Module):
    """Embeddings and layers `< cut` (and, with SFT, layer `cut` up to the code)."""

    def __init__(
        self,
        family: _Family,
        config: Any,
        embed: dict[str, nn.Module],
        shared: dict[str, nn.Module],
        layers: list[nn.Module],
        sft: _SftDeviceHalf | None,
        uses_token_type_ids: bool,
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.embed = nn.ModuleDict(embed)
        self.shared = nn.ModuleDict(shared)
        self.layers = nn.ModuleList(layers)
        self.sft = sft
        self.uses_token_type_ids = uses_token_type_ids

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(activations at the cut [B, L, width], padding mask [B, L] or None)."""
        if pixel_values is not None:
            inputs: dict[str, Tensor | None] = {"pixel_values": pixel_values}
            mask = None
        else:
            if input_ids is None:
                raise ModelError("the device segment needs input_ids (text) or pixel_values")
            types = token_type_ids if self.uses_token_type_ids else None
            inputs = {"input_ids": input_ids, "token_type_ids": types}
            mask = attention_mask
        hidden = self.family.embed(self.embed, inputs)
        ctx = self.family.context(self.config, self.shared, hidden, mask)
        for layer in self.layers:
            hidden = self.family.run_layer(layer, hidden, ctx)
        if self.sft is not None:
            hidden = self.sft(hidden, ctx)
        return hidden, mask


class CloudSegment(nn.Module):
    """Layers `>= cut` (with SFT: the rest of layer `cut`), the final norm, the pooling."""

    def __init__(
        self,
        family: _Family,
        config: Any,
        shared: dict[str, nn.Module],
        sft: _SftCloudHalf | None,
        layers: list[nn.Module],
        final: dict[str, nn.Module],
        pooling: str,
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.shared = nn.ModuleDict(shared)
        self.sft = sft
        self.layers = nn.ModuleList(layers)
        self.final = nn.ModuleDict(final)
        self.pooling = pooling

    pool = SequenceClassifier.pool  # the classifier's own pooling, unchanged

    def hidden_states(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        """The backbone's last hidden states [B, L, hidden], from the cut activations."""
        if self.sft is not None:
            hidden = self.sft(hidden)
        ctx = self.family.context(self.config, self.shared, hidden, mask)
        for layer in self.layers:
            hidden = self.family.run_layer(layer, hidden, ctx)
        return self.family.final(self.final, hidden)

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        return self.pool(self.hidden_states(hidden, mask), mask)


class TokenCloudSegment(CloudSegment):
    """Layers `>= cut` and the final norm, without pooling: the hidden states of every
    token [B, L, hidden] (span extractors, causal LMs)."""

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        return self.hidden_states(hidden, mask)


class HeadSegment(nn.Module):
    """Dropout, the linear head and the loss: `SequenceClassifier.classify`, unchanged."""

    def __init__(self, model: SequenceClassifier) -> None:
        super().__init__()
        self.dropout = model.dropout
        self.head = model.head
        self.problem = model.problem
        self.label_smoothing = model.label_smoothing
        self.num_labels = model.num_labels

    classify = SequenceClassifier.classify
    loss = SequenceClassifier.loss

    def forward(
        self, pooled: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> Any:
        """`mask` is unused: pooled features have no padding."""
        return self.classify(pooled, labels)


class SpanHeadSegment(nn.Module):
    """Dropout, the linear head (hidden -> start, end) and the span loss on every token:
    `SpanExtractor.span`, unchanged."""

    def __init__(self, model: SpanExtractor) -> None:
        super().__init__()
        self.dropout = model.dropout
        self.head = model.head

    span = SpanExtractor.span

    def forward(
        self, hidden: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> SpanOutput:
        return self.span(hidden, labels, mask)


@dataclass
class SplitClassifier:
    """The three pieces of a cut classifier and where the head runs."""

    device: DeviceSegment
    cloud: CloudSegment
    head: nn.Module  # HeadSegment, SpanHeadSegment (or an LM head): head(features, labels, mask)
    labels: Labels
    width: int  # values per token crossing the cut (hidden size, or the SFT rank)
    hidden_size: int  # width of the cloud's output rows (U-shaped return crossing)
    cut: int
    family: str

    names: dict[int, str] = field(default_factory=dict)  # id(parameter) -> model's name

    def device_modules(self) -> list[nn.Module]:
        return [self.device, self.head] if self.labels == "device" else [self.device]

    def cloud_modules(self) -> list[nn.Module]:
        return [self.cloud, self.head] if self.labels == "cloud" else [self.cloud]

    def named_trainable(self, modules: list[nn.Module]) -> dict[str, nn.Parameter]:
        """Trainable parameters of `modules` under the uncut model's names (SFT factors,
        which the uncut model lacks, as `<layer>.sft.<V|S|U|bias>`)."""
        out: dict[str, nn.Parameter] = {}
        for module in modules:
            for name, p in module.named_parameters():
                if p.requires_grad:
                    out[self.names.get(id(p), name)] = p
        return out


# which parts of a cut model a process keeps: a device its own segment (and the head when
# U-shaped), the cloud (or a test holding both sides) every part
Party = Literal["device", "all"]


def store_base(split: SplitClassifier, base_dtype: BaseDtype, party: Party) -> None:
    """Store the frozen base of the parts `party` keeps in `base_dtype` (in place), after
    the cut: a device converts only its segment, never the layers it is about to drop, and
    its token table, which the uncut model ties to the LM head (and so keeps fp32), is held
    by the device segment alone and is stored in `base_dtype` too. "all" converts the whole
    cut model, where the tie is seen and the table stays fp32 with the LM head, as in
    centralized training. SFT's factors were built at the cut from the fp32 weights, on
    both sides alike; they train, so they stay fp32."""
    if base_dtype == "fp32":
        return
    parts = split.device_modules() if party == "device" else [split.device, split.cloud, split.head]
    apply_base_dtype(nn.ModuleList(parts), base_dtype)


def num_layers(model: nn.Module) -> int:
    clf = unwrap(model)
    assert isinstance(clf, SequenceClassifier)
    return len(FAMILY_OPS[clf.family].layers(clf.backbone))


def cut_classifier(
    model: nn.Module, cut: int, *, labels: Labels = "cloud", sft_rank: int | None = None
) -> SplitClassifier:
    """Cut `model` (a SequenceClassifier, possibly peft-wrapped) at layer `cut`.

    The segments share the model's modules (and parameters); SFT factors are new
    parameters replacing layer `cut`'s first FFN matrix. A `SpanExtractor` is cut into
    a cloud that returns every token's hidden states and its span head.
    """
    clf = unwrap(model)
    if not isinstance(clf, SequenceClassifier):
        raise ModelError(f"can only cut a SequenceClassifier, not {type(clf).__name__}")
    if clf.family not in FAMILY_OPS:
        raise ModelError(
            f"cannot cut a {clf.family} model; families that can be cut: {', '.join(FAMILY_OPS)}"
        )
    if labels not in ("cloud", "device"):
        raise ModelError(f"split.labels must be 'cloud' or 'device', not {labels!r}")
    head = SpanHeadSegment(clf) if isinstance(clf, SpanExtractor) else HeadSegment(clf)
    device, cloud, width, names = cut_parts(
        model, FAMILY_OPS[clf.family], clf.backbone, cut, sft_rank=sft_rank,
        uses_token_type_ids=clf.uses_token_type_ids, pooling=clf.pooling,
        cloud_cls=TokenCloudSegment if isinstance(head, SpanHeadSegment) else CloudSegment,
    )  # fmt: skip
    hidden_size = int(clf.backbone.config.hidden_size)
    return SplitClassifier(
        names=names,
        device=device,
        cloud=cloud,
        head=head,
        labels=labels,
        width=width,
        hidden_size=hidden_size,
        cut=cut,
        family=clf.family,
    )


def cut_parts(
    model: nn.Module,
    family: _Family,
    backbone: HFModule,
    cut: int,
    *,
    sft_rank: int | None,
    uses_token_type_ids: bool,
    pooling: str,
    cloud_cls: type[CloudSegment] = CloudSegment,
) -> tuple[DeviceSegment, CloudSegment, int, dict[int, str]]:
    """The device and cloud segments of `backbone` cut at `cut` (shared by classifiers
    and causal LMs), the width crossing the cut, and parameter names under `model`."""
    layers = list(family.layers(backbone))
    if not 1 <= cut < len(layers):
        raise ModelError(
            f"split.cut = {cut} is outside this {len(layers)}-layer model; valid cuts: "
            f"1 to {len(layers) - 1} (layers < cut run on the device)"
        )
    shared = family.shared_modules(backbone)
    device_sft = cloud_sft = None
    cloud_layers = layers[cut:]
    width = int(backbone.config.hidden_size)
    if sft_rank is not None:
        weight, bias = family.sft_ffn_in(layers[cut])
        factors = SftFactors(weight, bias, sft_rank)
        device_sft = _SftDeviceHalf(family, layers[cut], factors)
        cloud_sft = _SftCloudHalf(family, layers[cut], factors)
        cloud_layers = layers[cut + 1 :]
        width = sft_rank
    device = DeviceSegment(
        family, backbone.config, family.embed_modules(backbone), shared, layers[:cut],
        device_sft, uses_token_type_ids,
    )  # fmt: skip
    cloud = cloud_cls(
        family, backbone.config, shared, cloud_sft, cloud_layers, family.final_modules(backbone),
        pooling,
    )  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    if sft_rank is not None:
        layer_name = next(n for n, m in model.named_modules() if m is layers[cut])
        for half in (device_sft, cloud_sft):
            assert half is not None
            for n, p in half.named_parameters(recurse=False):
                names[id(p)] = f"{layer_name}.sft.{n}"
    return device, cloud, width, names
