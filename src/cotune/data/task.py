"""The task contract: examples, splits, label space and metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cotune.data.metrics import compute


@dataclass
class Example:
    """One labelled example: a text or a text pair.

    `label` is a class index (int) for classification and a float for regression.
    """

    text_a: str
    text_b: str | None
    label: int | float


@dataclass
class Task:
    """A loaded task: train examples, one or more evaluation splits and their metrics.

    `metrics` maps an evaluation split to the metric keys reported on it; a split not
    listed there gets the defaults for `kind` (accuracy, or pearson and spearman).
    """

    name: str
    # "classification" | "regression" | "generation" | "qa" | "image-classification"
    kind: str  # (picks the adapter)
    num_labels: int
    label_names: list[str]
    train: list[Example]
    eval: dict[str, list[Example]]
    primary_metric: str
    metrics: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    def metric_keys(self, split: str) -> tuple[str, ...]:
        """The metric keys `compute_metrics` returns for `split`."""
        if split in self.metrics:
            return self.metrics[split]
        if self.metrics:
            valid = ", ".join(sorted(self.metrics))
            raise ValueError(f"task {self.name} has no evaluation split {split!r}; valid: {valid}")
        if self.kind == "regression":
            return ("pearson", "spearman")
        keys = ("accuracy",)
        return keys if self.primary_metric == "accuracy" else (*keys, self.primary_metric)

    def compute_metrics(
        self, split: str, preds: np.ndarray, labels: np.ndarray
    ) -> dict[str, float]:
        """Task metrics for predictions on `split`.

        `preds` are class indices for classification (logits of shape (n, num_labels)
        are also accepted and arg-maxed) and float predictions for regression.
        """
        return compute(self.metric_keys(split), preds, labels, self.kind, self.num_labels)

    def train_labels(self) -> list[int | float]:
        """The train labels in order (what the partitioners take)."""
        return [ex.label for ex in self.train]


@dataclass
class GenerationTask(Task):
    """A text generation task: `train` holds (prompt, target) pairs as `Example(text_a,
    text_b)`; each eval split holds one `Example(prompt)` per input, and `references`
    the reference texts of each, in the same order."""

    references: dict[str, list[list[str]]] = field(default_factory=dict)

    def compute_metrics(  # type: ignore[override]
        self, split: str, preds: Sequence[str], labels: np.ndarray | None = None
    ) -> dict[str, float]:
        """The E2E NLG metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr) of generated texts
        `preds` (one per input of `split`) against all references of each."""
        from cotune.data.e2e_metrics import e2e_scores

        refs = self.references[split]
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} outputs for {len(refs)} inputs of split {split!r}")
        return e2e_scores(list(preds), refs)
