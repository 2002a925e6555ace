"""A Gemma 3 GGUF file -> a transformers `Gemma3ForCausalLM` (de-quantized, fp32).

`gemma3_from_gguf(path)` reads the file with the `gguf` package's `GGUFReader`, builds
a `Gemma3TextConfig` from its metadata and de-quantizes every tensor (Q4_K, Q5_0, Q6_K,
Q8_0, ... through `gguf.quants.dequantize`) into fp32 under transformers' names
(`GGUF_TO_HF`). Two conventions differ from transformers' checkpoints:

- llama.cpp stores Gemma's RMSNorm weights as `1 + w` (its norm multiplies by the
  weight), transformers' `Gemma3RMSNorm` stores `w` and multiplies by `1 + w`: every
  `*norm.weight` is stored minus 1 (what transformers' own GGUF loader does too);
- Gemma's q/k projections are in rotate-half (NEOX) order in both, so unlike Llama no
  row permutation is undone.

What the GGUF does not record is Gemma 3's fixed architecture (as llama.cpp hard-codes
it): local (sliding-window) layers use rotary base 10,000, every 6th layer is global,
the FFN activation is tanh-approximated GELU, the LM head is tied to the embeddings and
queries are scaled by 1/sqrt(head_dim).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from cotune.errors import ModelError

ARCH = "gemma3"
LOCAL_ROPE_THETA = 10_000.0
SLIDING_WINDOW_PATTERN = 6  # layers 6k-1 (1-based 6k) are global, the others sliding

# GGUF per-layer tensor name (after `blk.N.`) -> transformers name (after `model.layers.N.`)
_LAYER_MAP: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_MAP: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",  # absent when the head is tied (Gemma 3 270M)
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
    """transformers' parameter name for GGUF tensor `gguf_name`; ModelError if unknown."""
    match = _BLOCK.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part in _LAYER_MAP:
            return f"model.layers.{layer}.{_LAYER_MAP[part]}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _TOP_MAP:
            return f"{_TOP_MAP[base]}.{kind}"
    raise ModelError(f"GGUF tensor {gguf_name!r} has no Gemma 3 counterpart in transformers")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelError(f"the GGUF file has no {key!r} metadata")
        return default
    return field.contents()


def gemma3_config(reader: Any) -> Gemma3TextConfig:
    """The `Gemma3TextConfig` a Gemma 3 GGUF's metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ModelError(f"expected a {ARCH} GGUF file, got architecture {arch!r}")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{ARCH}.{key}", default)

    layers = int(meta("block_count"))
    head_dim = int(meta("attention.key_length"))
    layer_types = [
        "full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for i in range(layers)
    ]
    has_head = any(t.name == "output.weight" for t in reader.tensors)
    return Gemma3TextConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=int(meta("embedding_length")),
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=int(meta("attention.head_count")),
        num_key_value_heads=int(meta("attention.head_count_kv")),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        sliding_window=int(meta("attention.sliding_window")),
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": float(meta("rope.freq_base"))},
            "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_ROPE_THETA},
        },
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        tie_word_embeddings=not has_head,
        architectures=["Gemma3ForCausalLM"],
    )


def gemma3_state_dict(reader: Any) -> dict[str, torch.Tensor]:
    """Every GGUF tensor de-quantized to fp32 under transformers' names (norms minus 1)."""
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = torch.from_numpy(values.reshape(shape).copy())
        if name.endswith("norm.weight"):
            weight = weight - 1.0
        state[name] = weight
    return state


def gemma3_from_gguf(path: Path) -> Gemma3ForCausalLM:
    """The fp32 `Gemma3ForCausalLM` stored (quantized) in the GGUF file at `path`."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    config = gemma3_config(reader)
    state = gemma3_state_dict(reader)
    model = Gemma3ForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelError(
            f"{path} does not fill a Gemma 3 model: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    model.tie_weights()
    return model.eval()
