"""The completion-only loss reads logits only where a completion token is predicted, so
`CompletionLM` (through transformers' `logits_to_keep` mask) and the splitfed LM head
compute the LM head only there: the loss and every gradient must equal those of the full
logits, for each causal-LM family, with LoRA, padding and Gemma's soft-capping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cotune.config.schema import ModelConfig
from cotune.data.pairs import IGNORE
from cotune.models.causal_lm import (
    CompletionLM,
    build_lm,
    completion_loss,
    completion_mask,
    keeps_masked_logits,
)
from cotune.models.cut_lm import LMHeadSegment

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(vocab_low: int, vocab_high: int) -> dict[str, torch.Tensor]:
    """4 rows of 14 tokens: prompts of 3-6 tokens, right padding of 0-5 tokens."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(vocab_low, vocab_high, (4, 14), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (prompt, pad) in enumerate([(3, 0), (5, 2), (4, 5), (6, 1)]):
        labels[row, :prompt] = IGNORE
        if pad:
            mask[row, -pad:] = 0
            labels[row, -pad:] = IGNORE
            ids[row, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_the_mask_marks_the_positions_that_predict_completion_tokens() -> None:
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, 8, 9, 4]])
    kept = completion_mask(labels)
    assert kept.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    logits = torch.randn(2, 5, 11)
    full = completion_loss(logits, labels, 0.1)
    assert torch.allclose(completion_loss(logits[kept], labels, 0.1, kept), full)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt2"])
def test_masked_logits_give_the_full_logits_loss_and_gradients(name: str) -> None:
    model, _, family = build_lm(ModelConfig(name=name, lora={"r": 4}), seed=0, label_smoothing=0.1)
    if family == "gemma3":
        model.lm.config.final_logit_softcapping = 3.0
    assert isinstance(model, CompletionLM) and model.masks_logits
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    batch = _batch(3, min(vocab, 2000))
    kept = completion_mask(batch["labels"])
    assert 0 < int(kept.sum()) <= kept.numel() - 20  # prompts and padding are left out

    sliced, grads = _loss_and_grads(model, batch)
    model.masks_logits = False
    full, full_grads = _loss_and_grads(model, batch)

    assert sliced.logits.shape == (int(kept.sum()), vocab)
    assert full.logits.shape == (4, 14, vocab)
    torch.testing.assert_close(sliced.logits, full.logits[kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert any("lora_A" in n for n in grads) and set(grads) == set(full_grads)
    for n, g in full_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_without_labels_every_position_has_logits() -> None:
    model, _, _ = build_lm(ModelConfig(name="tiny-llama"), seed=0)
    batch = _batch(3, 500)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.loss is None and out.kept is None and out.logits.shape[:2] == (4, 14)


class _OwnSlicingLM(nn.Module):
    """A causal LM whose class does not slice with transformers' helper."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 50)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):  # type: ignore[no-untyped-def]
        return type("Out", (), {"logits": self.head(self.emb(input_ids))})()


def test_models_that_cannot_mask_their_logits_compute_them_all() -> None:
    lm = _OwnSlicingLM()
    assert not keeps_masked_logits(lm)
    model = CompletionLM(lm)
    batch = _batch(3, 50)
    out = model(**batch)
    assert out.kept is None and out.logits.shape == (4, 14, 50)
    assert torch.allclose(out.loss, completion_loss(out.logits, batch["labels"]))


def test_the_split_lm_head_computes_only_the_kept_logits() -> None:
    torch.manual_seed(0)
    head = LMHeadSegment(nn.Linear(8, 30), label_smoothing=0.1, softcap=2.0)
    hidden = torch.randn(4, 14, 8, requires_grad=True)
    labels = _batch(3, 30)["labels"]
    out = head(hidden, labels)
    out.loss.backward()
    grad = hidden.grad.clone()
    kept = completion_mask(labels)
    assert out.logits.shape == (int(kept.sum()), 30)
    hidden.grad = None
    full = torch.tanh(head.lm_head(hidden) / 2.0) * 2.0
    full_loss = completion_loss(full, labels, 0.1)
    full_loss.backward()
    torch.testing.assert_close(out.loss, full_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-6, atol=1e-7)
    assert torch.all(grad[~kept] == 0)  # prompt and padding positions get no gradient
