"""Scoring an extractive QA model: start/end logits of every feature, answers by
`cotune.data.qa_postprocess`, SQuAD exact match and F1 (`cotune.data.squad_metrics`).

`model(**inputs, labels=...)` must return `.loss`, `.start_logits` and `.end_logits`
(a `SpanExtractor`, wrapped or not). The records (one per question) carry the
question's id, text, predicted answer, ground truths and its own exact match and F1
(x100, so their means are the split's metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cotune.data.qa_features import QAFeatures
from cotune.data.qa_postprocess import predict_answers
from cotune.data.squad import QAExample
from cotune.data.squad_metrics import example_scores, squad_scores
from cotune.training.evaluation import EvalResult, PredictionRecord
from cotune.training.loop import autocast, model_inputs
from cotune.training.placement import device_of, to_device


@dataclass
class QASplit:
    """One eval split: its questions, their features and the features' batches (in
    the features' order)."""

    examples: list[QAExample]
    features: QAFeatures
    loader: Iterable[dict[str, torch.Tensor]]


def qa_records(split: str, examples: list[QAExample], answers: list[str]) -> list[PredictionRecord]:
    records: list[PredictionRecord] = []
    for i, (ex, pred) in enumerate(zip(examples, answers, strict=True)):
        em, f1 = example_scores(pred, ex.answers)
        records.append({"split": split, "index": i, "id": ex.qid, "question": ex.question,
                        "prediction": pred, "answers": list(ex.answers),
                        "exact_match": 100.0 * em, "f1": 100.0 * f1})  # fmt: skip
    return records


@torch.no_grad()
def evaluate_qa(
    model: torch.nn.Module,
    splits: Mapping[str, QASplit],
    precision: str = "fp32",
    *,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> EvalResult:
    """Exact match and F1 on every split (merged), the mean loss over features, and
    one prediction record per question."""
    was_training = model.training
    model.eval()
    # a split device evaluates through its link: not an nn.Module, it stays on the CPU
    device = device_of(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    metrics: dict[str, float] = {}
    records: list[PredictionRecord] = []
    loss_sum, n_sum = 0.0, 0
    for split, part in splits.items():
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for cpu_batch in part.loader:
            batch = to_device(cpu_batch, device)
            with autocast(precision, device.type):
                out = model(**model_inputs(batch), labels=batch["labels"])
            n = int(cpu_batch["labels"].shape[0])
            loss_sum += float(out.loss) * n
            n_sum += n
            lengths = cpu_batch["attention_mask"].sum(dim=1).tolist()
            s_logits = out.start_logits.float().cpu().numpy()
            e_logits = out.end_logits.float().cpu().numpy()
            for row, k in enumerate(lengths):
                starts.append(s_logits[row, : int(k)])
                ends.append(e_logits[row, : int(k)])
        answers = predict_answers(
            [ex.context for ex in part.examples], part.features.example_index,
            part.features.offsets, starts, ends, n_best=n_best, max_answer_len=max_answer_len,
        )  # fmt: skip
        metrics.update(squad_scores(answers, [ex.answers for ex in part.examples]))
        records.extend(qa_records(split, part.examples, answers))
    model.train(was_training)
    return EvalResult(metrics=metrics, loss=loss_sum / max(n_sum, 1), predictions=records)
