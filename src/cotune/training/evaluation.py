"""Scoring a model on a task's evaluation splits.

- `evaluate`: classification and regression; `model(**inputs, labels=...)` must return
  `.loss` and `.logits` (a classifier, or a split device that evaluates through the
  link), predictions are argmax (or the regression value), metrics are the task's.
- `generate_texts` / `evaluate_generation`: beam search (beam, length penalty, no
  repeated n-grams, max new tokens from `[generation]`) and the task's metrics.

Both also return what the model predicted for every eval example, as the records of a
run folder's `predictions.jsonl` (`prediction_records`, `generation_records`): the
metrics are computed from exactly these predictions, so per-example statistics
(bootstrap intervals, paired differences) can be taken over them afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cotune.config import GenerationConfig
from cotune.data.pairs import eos_id, prompt_ids
from cotune.training.loop import autocast, model_inputs
from cotune.training.placement import device_of, to_device

PredictionRecord = dict[str, Any]  # one line of predictions.jsonl


@dataclass
class EvalResult:
    metrics: dict[str, float]
    loss: float
    predictions: list[PredictionRecord] = field(default_factory=list)


def prediction_records(
    split: str, preds: np.ndarray, labels: np.ndarray, kind: str
) -> list[PredictionRecord]:
    """One record per example of `split`, in the split's order: `{"split", "index",
    "label", "prediction"}`, plus `"correct"` for classification (so the mean of
    `correct` is the split's accuracy)."""
    records: list[PredictionRecord] = []
    if kind == "regression":
        for i, (p, y) in enumerate(zip(preds.tolist(), labels.tolist(), strict=True)):
            records.append({"split": split, "index": i, "label": float(y), "prediction": float(p)})
    else:
        for i, (p, y) in enumerate(zip(preds.tolist(), labels.tolist(), strict=True)):
            records.append({"split": split, "index": i, "label": int(y), "prediction": int(p),
                            "correct": int(p) == int(y)})  # fmt: skip
    return records


def generation_records(outputs: Mapping[str, list[str]], task: Any) -> list[PredictionRecord]:
    """One record per eval input: `{"split", "index", "prompt", "output"}` (the
    references are the task's, in the same order)."""
    return [
        {"split": split, "index": i, "prompt": ex.text_a, "output": hyp}
        for split, hyps in outputs.items()
        for i, (ex, hyp) in enumerate(zip(task.eval[split], hyps, strict=True))
    ]


@torch.no_grad()
def evaluate(
    model: Any,
    task: Any,
    loaders: Mapping[str, Iterable[dict[str, torch.Tensor]]],
    precision: str = "fp32",
) -> EvalResult:
    """Evaluate `model` on every eval split of `task`; returns merged metrics, mean loss
    and the per-example predictions the metrics were computed from."""
    was_training = model.training
    model.eval()
    # a split device evaluates through its link: not an nn.Module, it stays on the CPU
    device = device_of(model) if isinstance(model, nn.Module) else torch.device("cpu")
    merged: dict[str, float] = {}
    records: list[PredictionRecord] = []
    loss_sum, n_sum = 0.0, 0
    for split, loader in loaders.items():
        preds, labels = [], []
        for cpu_batch in loader:
            batch = to_device(cpu_batch, device)
            with autocast(precision, device.type):
                out = model(**model_inputs(batch), labels=batch["labels"])
            logits = out.logits.float().cpu()
            n = batch["labels"].shape[0]
            loss_sum += float(out.loss) * n
            n_sum += n
            if task.kind == "regression":
                preds.append(logits.squeeze(-1).numpy())
            else:
                preds.append(logits.argmax(-1).numpy())
            labels.append(cpu_batch["labels"].numpy())
        split_preds, split_labels = np.concatenate(preds), np.concatenate(labels)
        merged.update(task.compute_metrics(split, split_preds, split_labels))
        records.extend(prediction_records(split, split_preds, split_labels, task.kind))
    model.train(was_training)
    return EvalResult(metrics=merged, loss=loss_sum / max(n_sum, 1), predictions=records)


@torch.no_grad()
def generate_texts(
    lm: nn.Module, tokenizer: Any, prompts: list[str], gen: GenerationConfig
) -> list[str]:
    """Beam-search completions of `prompts` (left-padded batches of `gen.batch_size`),
    decoded without special tokens."""
    pad = int(tokenizer.pad_token_id)
    end = eos_id(tokenizer)
    device = device_of(lm)
    was = lm.training
    lm.eval()
    out: list[str] = []
    for start in range(0, len(prompts), gen.batch_size):
        ids = [prompt_ids(tokenizer, p) for p in prompts[start : start + gen.batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x) :] = torch.as_tensor(x)
            mask[row, width - len(x) :] = 1
        seqs = lm.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            num_beams=gen.num_beams,
            length_penalty=gen.length_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size,
            max_new_tokens=gen.max_new_tokens,
            early_stopping=True,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=pad,
        )
        for row in seqs[:, width:].cpu():
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    lm.train(was)
    return out


def evaluate_generation(
    lm: nn.Module, tokenizer: Any, task: Any, gen: GenerationConfig
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Generate for every eval input of `task` and score with its metrics; returns
    (metrics, generated texts per split)."""
    from cotune.data.e2e_metrics import e2e_scores

    metrics: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    for split, examples in task.eval.items():
        hyps = generate_texts(lm, tokenizer, [ex.text_a for ex in examples], gen)
        texts[split] = hyps
        metrics.update(e2e_scores(hyps, task.references[split], gen.metrics))
    return metrics, texts


def write_generations(run_dir: str | Path, task: Any, outputs: dict[str, list[str]]) -> None:
    """The generated texts, one JSON line per input: {"split", "prompt", "output", "refs"}."""
    with open(Path(run_dir) / "generations.jsonl", "w", encoding="utf-8") as f:
        for split, hyps in outputs.items():
            for ex, hyp, refs in zip(task.eval[split], hyps, task.references[split], strict=True):
                rec = {"split": split, "prompt": ex.text_a, "output": hyp, "refs": refs}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
