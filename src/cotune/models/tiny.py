"""Tiny randomly initialised configs, one per family, for tests and fast runs.

Text families share the packaged all-MiniLM-L6-v2 WordPiece tokenizer (offline), so a
tiny model runs real text end to end: `vocab_size` is that tokenizer's size and the pad,
CLS/BOS and SEP/EOS ids are its `[PAD]`, `[CLS]` and `[SEP]`. Every tiny model has 4
layers (so the default `split.cut = 3` leaves a layer on each side), hidden size 64,
4 heads and an FFN of 128. `tiny-vit` takes 1x28x28 images (Fashion-MNIST) in 4x4
patches; `tiny-dinov2` takes RGB images of any multiple of its 14x14 patches (its 2x2
grid of position embeddings is interpolated, as in dinov2-small).
"""

from __future__ import annotations

from typing import TypedDict

from transformers import (
    BertConfig,
    Dinov2Config,
    DistilBertConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    RobertaConfig,
    ViTConfig,
)

from cotune.errors import ModelError

TINY_LAYERS = 4
TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_FFN = 128
TINY_MAX_POSITIONS = 512
TINY_IMAGE_SIZE = 28
TINY_PATCH_SIZE = 4
TINY_CHANNELS = 1

# The all-MiniLM-L6-v2 WordPiece vocabulary (bert-base-uncased): [PAD]=0, [CLS]=101, [SEP]=102.
MINILM_VOCAB_SIZE = 30522
MINILM_PAD_ID = 0
MINILM_CLS_ID = 101
MINILM_SEP_ID = 102

TINY_FAMILIES = ("bert", "roberta", "distilbert", "llama", "gemma3", "gpt2", "vit", "dinov2")
TINY_DINOV2_PATCH = 14  # as dinov2-small, so that task.image_size means the same for both
# tiny-gemma3: sliding-window layers 0 and 2 (window 16 tokens, rotary base 10,000) and
# global layers 1 and 3 (rotary base 1,000,000), as Gemma 3 alternates them (5:1 there).
TINY_GEMMA3_WINDOW = 16
TINY_GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention"] * (TINY_LAYERS // 2)


class _CommonText(TypedDict):
    """Config keys every tiny text family shares."""

    vocab_size: int
    pad_token_id: int


def tiny_config(
    family: str,
    *,
    vocab_size: int = MINILM_VOCAB_SIZE,
    pad_token_id: int = MINILM_PAD_ID,
    bos_token_id: int = MINILM_CLS_ID,
    eos_token_id: int = MINILM_SEP_ID,
) -> PretrainedConfig:
    """A tiny config of `family`; token ids default to the minilm tokenizer's."""
    common_text: _CommonText = {"vocab_size": vocab_size, "pad_token_id": pad_token_id}
    if family == "bert":
        return BertConfig(
            **common_text,
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=TINY_FFN,
            max_position_embeddings=TINY_MAX_POSITIONS,
            type_vocab_size=2,
        )
    if family == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, hence the extra positions.
        # type_vocab_size=2 so that sentence-pair token_type_ids from WordPiece work.
        return RobertaConfig(
            **common_text,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=TINY_FFN,
            max_position_embeddings=TINY_MAX_POSITIONS + pad_token_id + 2,
            type_vocab_size=2,
        )
    if family == "distilbert":
        return DistilBertConfig(
            **common_text,
            dim=TINY_HIDDEN,
            n_layers=TINY_LAYERS,
            n_heads=TINY_HEADS,
            hidden_dim=TINY_FFN,
            max_position_embeddings=TINY_MAX_POSITIONS,
        )
    if family == "llama":
        return LlamaConfig(
            **common_text,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_HEADS // 2,
            intermediate_size=TINY_FFN,
            max_position_embeddings=TINY_MAX_POSITIONS,
            tie_word_embeddings=True,
        )
    if family == "gemma3":
        head_dim = TINY_HIDDEN // TINY_HEADS
        return Gemma3TextConfig(
            **common_text,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_HEADS // 2,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            intermediate_size=TINY_FFN,
            max_position_embeddings=TINY_MAX_POSITIONS,
            sliding_window=TINY_GEMMA3_WINDOW,
            layer_types=list(TINY_GEMMA3_LAYER_TYPES),
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            tie_word_embeddings=True,
        )
    if family == "gpt2":
        return GPT2Config(
            **common_text,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            n_embd=TINY_HIDDEN,
            n_layer=TINY_LAYERS,
            n_head=TINY_HEADS,
            n_inner=TINY_FFN,
            n_positions=TINY_MAX_POSITIONS,
        )
    if family == "vit":
        return ViTConfig(
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=TINY_FFN,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_PATCH_SIZE,
            num_channels=TINY_CHANNELS,
        )
    if family == "dinov2":
        return Dinov2Config(
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            mlp_ratio=TINY_FFN // TINY_HIDDEN,
            image_size=2 * TINY_DINOV2_PATCH,
            patch_size=TINY_DINOV2_PATCH,
            layerscale_value=1.0,
        )
    raise ModelError(
        f"there is no tiny config for model family {family!r}; "
        f"valid families: {', '.join(TINY_FAMILIES)}"
    )
