"""LoRA via peft on the classifier and on causal LMs, and the adapter state helpers."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from cotune.config.schema import LoraConfig, ModelConfig
from cotune.errors import ModelError
from cotune.models import (
    DEFAULT_TARGETS,
    SequenceClassifier,
    adapter_state_dict,
    apply_lora,
    build_classifier,
    load_adapter_state_dict,
    load_causal_lm,
    load_tokenizer,
    trainable_parameters,
    unwrap,
)

FAMILIES = ("bert", "roberta", "distilbert", "llama", "gpt2", "vit")
SENTENCES = ["a short one", "this sentence is a good deal longer than the first"]


def _lora_model(family: str, seed: int = 0, **lora: object) -> tuple:
    cfg = ModelConfig(name=f"tiny-{family}", lora=LoraConfig(**lora))
    return build_classifier(cfg, 3, seed=seed)


def _inputs(family: str, tokenizer: object) -> dict[str, torch.Tensor]:
    if family == "vit":
        return {
            "pixel_values": torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        }
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def _perturb(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_get_lora_and_only_adapters_train(family: str) -> None:
    model, _, _ = _lora_model(family)
    inner = unwrap(model)
    assert isinstance(inner, SequenceClassifier)
    lora_layers = {
        n.rsplit(".", 1)[-1] for n, m in inner.named_modules() if isinstance(m, LoraLayer)
    }
    assert lora_layers == set(DEFAULT_TARGETS[family])
    n_lora = sum(1 for _, m in inner.named_modules() if isinstance(m, LoraLayer))
    assert n_lora == len(DEFAULT_TARGETS[family]) * inner.backbone.config.num_hidden_layers
    for name, p in model.named_parameters():
        expected = "lora_" in name or ".head.modules_to_save." in name
        assert p.requires_grad == expected, name
    total = sum(p.numel() for p in model.parameters())
    assert trainable_parameters(model) < total / 10


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_adapters_and_head(family: str) -> None:
    model, tokenizer, _ = _lora_model(family)
    model.train()
    out = model(**_inputs(family, tokenizer), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_custom_targets_and_bad_targets() -> None:
    model, _, _ = _lora_model("bert", target_modules=["query", "key", "value", "dense"])
    names = {
        n.rsplit(".", 1)[-1] for n, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)
    }
    assert names == {"query", "key", "value", "dense"}
    with pytest.raises(ModelError, match="q_proj not found.*query"):
        _lora_model("bert", target_modules=["q_proj"])


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "vit"])
def test_adapter_round_trip_restores_outputs(family: str) -> None:
    model, tokenizer, _ = _lora_model(family)
    model.eval()
    inputs = _inputs(family, tokenizer)
    with torch.no_grad():
        before = model(**inputs).logits
    saved = adapter_state_dict(model)
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v.numel() for v in saved.values()) == trainable_parameters(model)
    assert all(("lora_" in k) or (".head." in k) for k in saved)

    load_adapter_state_dict(model, _perturb(saved))
    with torch.no_grad():
        changed = model(**inputs).logits
    assert not torch.allclose(changed, before)

    load_adapter_state_dict(model, saved)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(after, before)


def test_adapter_moves_between_identically_built_models() -> None:
    a, tokenizer, _ = _lora_model("roberta", seed=0)
    b, _, _ = _lora_model("roberta", seed=0)
    load_adapter_state_dict(a, _perturb(adapter_state_dict(a)))
    a.eval()
    b.eval()
    inputs = _inputs("roberta", tokenizer)
    with torch.no_grad():
        assert not torch.allclose(a(**inputs).logits, b(**inputs).logits)
        load_adapter_state_dict(b, adapter_state_dict(a))
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)


def test_adapter_state_is_a_copy() -> None:
    model, _, _ = _lora_model("bert")
    saved = adapter_state_dict(model)
    name = next(iter(saved))
    saved[name].add_(1.0)
    assert not torch.equal(dict(model.named_parameters())[name], saved[name])


def test_load_rejects_wrong_shapes_and_names() -> None:
    model, _, _ = _lora_model("bert", r=4)
    other, _, _ = _lora_model("bert", r=8)
    with pytest.raises(ModelError, match="wrong shape"):
        load_adapter_state_dict(model, adapter_state_dict(other))
    state = adapter_state_dict(model)
    missing = dict(list(state.items())[1:])
    with pytest.raises(ModelError, match="missing 1"):
        load_adapter_state_dict(model, missing)
    extra = {**state, "base_model.model.extra.weight": torch.zeros(1)}
    with pytest.raises(ModelError, match="unexpected 1"):
        load_adapter_state_dict(model, extra)
    head = next(k for k in state if k.endswith("head.modules_to_save.default.weight"))
    with pytest.raises(ModelError, match="wrong shape"):
        load_adapter_state_dict(model, {**state, head: torch.zeros(5, state[head].shape[1])})


def test_full_fine_tuning_state_is_everything() -> None:
    model, _, _ = build_classifier(ModelConfig(name="tiny-distilbert"), 2)
    state = adapter_state_dict(model)
    assert trainable_parameters(model) == sum(p.numel() for p in model.parameters())
    assert set(state) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_on_causal_lm(family: str) -> None:
    lm = load_causal_lm(f"tiny-{family}")
    total = sum(p.numel() for p in lm.parameters())
    model = apply_lora(lm, LoraConfig(r=4), family)  # default modules_to_save has no head here
    assert 0 < trainable_parameters(model) < total / 10
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    tokenizer = load_tokenizer(f"tiny-{family}")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if "lora_B" in n
    )
    prompt = tokenizer(["hello"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert generated.shape[1] == 5  # [CLS] hello [SEP] + 2 new
