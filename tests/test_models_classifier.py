"""SequenceClassifier and build_classifier on the tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cotune.config.schema import ModelConfig
from cotune.errors import ModelError
from cotune.models import SequenceClassifier, build_classifier, load_backbone
from cotune.models.classifier import auto_pooling, checkpoint_pooling, last_token_pool, mean_pool
from cotune.models.zoo import ModelSource

TEXT_FAMILIES = ("bert", "roberta", "distilbert", "llama", "gpt2")
SENTENCES = ["a short one", "this sentence is a good deal longer than the first"]


def _build(name: str, num_labels: int = 3, **kwargs: object) -> tuple:
    pooling = kwargs.pop("pooling", "auto")
    return build_classifier(ModelConfig(name=name, pooling=pooling), num_labels, **kwargs)


def _batch(tokenizer: object, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def _backbone_grads(model: SequenceClassifier) -> tuple[int, int]:
    with_grad = [
        p for p in model.backbone.parameters() if p.grad is not None and p.grad.abs().sum() > 0
    ]
    return len(with_grad), len(list(model.backbone.parameters()))


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_forward_backward(family: str) -> None:
    model, tokenizer, source = _build(f"tiny-{family}", num_labels=3)
    assert isinstance(model, SequenceClassifier)
    assert source.family == family
    model.train()
    out = model(**_batch(tokenizer, SENTENCES), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    assert out.loss is not None and out.loss.ndim == 0
    out.loss.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    touched, total = _backbone_grads(model)
    assert touched > total // 2  # gradients reach the backbone, not just the head


def test_vit_forward_backward_with_pixel_values() -> None:
    model, tokenizer, source = _build("tiny-vit", num_labels=10)
    assert tokenizer is None and source.family == "vit"
    assert model.pooling == "cls"
    model.train()
    out = model(pixel_values=torch.randn(4, 1, 28, 28), labels=torch.tensor([0, 1, 2, 9]))
    assert out.logits.shape == (4, 10)
    out.loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    touched, total = _backbone_grads(model)
    assert touched > total // 2


@pytest.mark.parametrize("family", [*TEXT_FAMILIES, "vit"])
def test_seeded_build_is_identical(family: str) -> None:
    a = _build(f"tiny-{family}", seed=5)[0].state_dict()
    b = _build(f"tiny-{family}", seed=5)[0].state_dict()
    c = _build(f"tiny-{family}", seed=6)[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


@pytest.mark.parametrize(
    ("family", "pooling"),
    [
        ("bert", "mean"),
        ("roberta", "mean"),
        ("distilbert", "mean"),
        ("llama", "last"),
        ("gpt2", "last"),
    ],
)
def test_auto_pooling_and_padding_invariance(family: str, pooling: str) -> None:
    model, tokenizer, _ = _build(f"tiny-{family}")
    assert model.pooling == pooling
    assert tokenizer.padding_side == "right"
    model.eval()
    with torch.no_grad():
        padded = model(**_batch(tokenizer, SENTENCES)).logits
        alone = model(**_batch(tokenizer, SENTENCES[:1])).logits
    assert _batch(tokenizer, SENTENCES)["attention_mask"][0].sum() < len(
        _batch(tokenizer, SENTENCES)["attention_mask"][0]
    )  # the first sentence really is padded
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)


def test_padding_matters_without_mask_aware_pooling() -> None:
    # Guard for the test above: a plain mean over all positions (pads included) differs
    # between padded and unpadded input, the masked mean does not.
    model, tokenizer, _ = _build("tiny-bert")
    model.eval()
    batch = _batch(tokenizer, SENTENCES)
    with torch.no_grad():
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        alone = model.encode(**_batch(tokenizer, SENTENCES[:1]))
    assert not torch.allclose(hidden[0].mean(0), alone[0].mean(0), atol=1e-5)
    torch.testing.assert_close(
        model.pool(hidden, batch["attention_mask"])[0],
        model.pool(alone, None)[0],
        atol=1e-5,
        rtol=0,
    )


def test_last_token_pool_picks_last_real_token() -> None:
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_pool(hidden, right).flatten().tolist() == [2.0, 9.0]
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_token_pool(hidden, left).flatten().tolist() == [4.0, 9.0]
    assert last_token_pool(hidden, None).flatten().tolist() == [4.0, 9.0]


def test_mean_pool_ignores_masked_positions() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0
    assert mean_pool(hidden, None).item() == pytest.approx(104 / 3)


def test_explicit_pooling_overrides_auto() -> None:
    model, _, _ = _build("tiny-llama", pooling="mean")
    assert model.pooling == "mean"
    model, _, _ = _build("tiny-bert", pooling="cls")
    assert model.pooling == "cls"


def test_pieces_compose_to_forward() -> None:
    model, tokenizer, _ = _build("tiny-gpt2")
    model.eval()
    batch = _batch(tokenizer, SENTENCES)
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        whole = model(**batch, labels=labels)
        hidden = model.backbone(**batch).last_hidden_state
        parts = model.classify(model.pool(hidden, batch["attention_mask"]), labels)
    torch.testing.assert_close(whole.logits, parts.logits)
    torch.testing.assert_close(whole.loss, parts.loss)


def test_regression_uses_mse() -> None:
    model, tokenizer, _ = _build("tiny-bert", num_labels=1, problem="regression")
    assert model.problem == "regression"
    model.eval()
    labels = torch.tensor([0.5, 4.0])
    out = model(**_batch(tokenizer, SENTENCES), labels=labels)
    assert out.logits.shape == (2, 1)
    expected = torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels)
    torch.testing.assert_close(out.loss, expected)


def test_label_smoothing_changes_the_loss() -> None:
    plain, tokenizer, _ = _build("tiny-bert", label_smoothing=0.0)
    smooth, _, _ = _build("tiny-bert", label_smoothing=0.2)
    batch, labels = _batch(tokenizer, SENTENCES), torch.tensor([0, 1])
    with torch.no_grad():
        a, b = plain(**batch, labels=labels), smooth(**batch, labels=labels)
    torch.testing.assert_close(a.logits, b.logits)
    expected = torch.nn.functional.cross_entropy(b.logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(b.loss, expected)
    assert not torch.allclose(a.loss, b.loss)


def test_bad_problem_and_labels() -> None:
    with pytest.raises(ModelError, match="valid: classification, regression"):
        _build("tiny-bert", problem="ranking")
    with pytest.raises(ModelError, match="regression task has 1 output"):
        _build("tiny-bert", num_labels=3, problem="regression")
    with pytest.raises(ModelError, match="at least 1"):
        _build("tiny-bert", num_labels=0)


def test_checkpoint_pooling_is_read(tmp_path: Path) -> None:
    assert checkpoint_pooling(str(tmp_path)) is None
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    assert checkpoint_pooling(str(tmp_path)) == "cls"
    source = ModelSource(name="x", path=str(tmp_path), family="bert", origin="local folder")
    assert auto_pooling(source) == "cls"
    assert auto_pooling(ModelSource("y", None, "roberta", "random init (tiny)")) == "mean"


def test_token_type_ids_only_go_to_models_that_take_them() -> None:
    model, _, _ = _build("tiny-distilbert")
    assert not model.uses_token_type_ids
    ids = torch.tensor([[101, 2023, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model(ids, mask, token_type_ids=torch.ones_like(ids)).logits
        b = model(ids, mask).logits
    torch.testing.assert_close(a, b)
    bert, _, _ = _build("tiny-bert")
    assert bert.uses_token_type_ids


def test_head_sits_on_unmodified_backbone() -> None:
    model, _, _ = _build("tiny-llama", seed=2)
    reference = load_backbone("tiny-llama", seed=2)
    assert type(model.backbone) is type(reference)
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.backbone.state_dict().items())
