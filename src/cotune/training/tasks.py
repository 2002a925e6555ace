"""Task adapters: what a method needs from a task, chosen by the task's kind.

A method never branches on a task's name: it asks `adapter_for(task, cfg)` for the
model to train, how examples become batches, and how a model is scored.

| kind | model | batches | evaluation |
|---|---|---|---|
| classification, regression | `build_classifier` (pooling head; LoRA via peft) | `encode` + `PadCollator` | argmax / value, the task's metrics, loss |
| generation | `build_lm` (causal LM, completion-only loss) | `encode_pairs` + `PairCollator` | beam search, the task's metrics; texts saved |
| qa | `build_span_model` (start/end logits per token) | `encode_qa` (context windows) + `PadCollator` | best valid span per question, SQuAD EM / F1 |
| image-classification | `build_classifier` on an image model (CLS pooling; LoRA via peft) | `encode_images` (resized once, uint8) + `ImageCollator` (`pixel_values`) | argmax, accuracy, loss |

Every evaluation also carries its per-example predictions (`Evaluation.predictions`,
the records of a run folder's `predictions.jsonl`).

Knowledge distillation (fedkd) asks the adapter for a model output's `distributions`:
the class logits of each example (classification, images), or the start and the end
logits over each feature's tokens (QA, padding masked). Per-token distributions
(`token_level`) pair two models' outputs token by token, so both must tokenise alike.
Regression and generation have none.

A new task kind is one new adapter class and one line in `ADAPTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from torch import Tensor, nn
from torch.utils.data import DataLoader

from cotune.config import Config
from cotune.config.schema import ModelConfig
from cotune.data import Example, PadCollator, Task, encode, make_loader
from cotune.data.encode import EncodedDataset
from cotune.data.images import ImageCollator, encode_images
from cotune.data.pairs import PairCollator, PairDataset, encode_pairs, pair_loader
from cotune.data.qa_features import encode_qa
from cotune.data.squad import QAExample
from cotune.errors import ConfigError, ModelError
from cotune.models import build_classifier, image_geometry
from cotune.models.causal_lm import build_lm, generation_model
from cotune.models.span import build_span_model
from cotune.models.zoo import IMAGE_FAMILIES
from cotune.training.evaluation import (
    PredictionRecord,
    evaluate,
    evaluate_generation,
    generation_records,
    write_generations,
)
from cotune.training.qa_evaluation import QASplit, evaluate_qa

Encoded = EncodedDataset | PairDataset  # tokenised (resized) once, unpadded
Collator = Callable[[list[dict[str, Any]]], dict[str, Tensor]]


class Distribution(NamedTuple):
    """Logits of one categorical distribution per row, over the last dimension, and
    which entries are candidates (`mask`, same shape; None: all)."""

    logits: Tensor
    mask: Tensor | None = None


@dataclass
class Evaluation:
    """Metrics of one evaluation (with `loss` when the task has one), what the model
    produced (generated texts per split; empty for classifiers), and one prediction
    record per eval example (`{"split", "index", "label", "prediction"[, "correct"]}`,
    `{"split", "index", "prompt", "output"}` for generation, `{"split", "index", "id",
    "question", "prediction", "answers", "exact_match", "f1"}` for extractive QA), from
    which the metrics were computed."""

    metrics: dict[str, float]
    outputs: dict[str, list[str]] = field(default_factory=dict)
    predictions: list[PredictionRecord] = field(default_factory=list, repr=False)


class TaskAdapter(Protocol):
    task: Task
    cfg: Config
    # whether `distributions` are per token (two models' outputs pair token by token)
    token_level: bool

    def build_model(
        self, model_cfg: ModelConfig | None = None, seed: int | None = None
    ) -> tuple[nn.Module, Any]:
        """A fresh (model, tokenizer) for this task (`cfg.model` unless `model_cfg`)."""
        ...

    def encode(self, examples: list[Example], tokenizer: Any) -> Encoded:
        """Tokenise examples once (unpadded)."""
        ...

    def collator(self, tokenizer: Any) -> Collator:
        """How encoded items become a batch (padding, pixel values)."""
        ...

    def loader(
        self, ds: Encoded, tokenizer: Any, *, shuffle: bool, seed: int, batch_size: int = 0
    ) -> DataLoader:
        """Seeded batches of `ds`, padded to their longest row (`train.batch_size`
        unless `batch_size`)."""
        ...

    def distributions(self, output: Any, batch: dict[str, Tensor]) -> list[Distribution]:
        """The categorical distributions of a model's `output` on `batch` that
        distillation matches (float32 logits); a `ConfigError` for tasks without any."""
        ...

    def evaluate(self, model: Any, tokenizer: Any) -> Evaluation:
        """Score `model` on every eval split."""
        ...

    def save_outputs(self, run_dir: str | Path, evaluation: Evaluation) -> None:
        """Write what the model produced into the run folder (nothing for classifiers)."""
        ...


class ClassificationAdapter:
    """Classification and regression with a pooling head."""

    token_level = False

    def __init__(self, task: Task, cfg: Config) -> None:
        self.task = task
        self.cfg = cfg
        self._evals: tuple[int, dict[str, DataLoader]] | None = None

    def build_model(
        self, model_cfg: ModelConfig | None = None, seed: int | None = None
    ) -> tuple[nn.Module, Any]:
        model_cfg = model_cfg or self.cfg.model
        model, tokenizer, source = build_classifier(
            model_cfg,
            self.task.num_labels,
            problem=self.task.kind,
            label_smoothing=self.cfg.train.label_smoothing,
            seed=self.cfg.seed if seed is None else seed,
        )
        if source.family in IMAGE_FAMILIES:
            raise ModelError(
                f"model {model_cfg.name!r} is an image model; task {self.task.name!r} is a "
                f"{self.task.kind} task on text: use a text model"
            )
        return model, tokenizer

    def encode(self, examples: list[Example], tokenizer: Any) -> Encoded:
        return encode(examples, tokenizer, self.cfg.train.max_seq_len)

    def collator(self, tokenizer: Any) -> Collator:
        return PadCollator(tokenizer.pad_token_id if tokenizer is not None else 0)

    def loader(
        self, ds: Encoded, tokenizer: Any, *, shuffle: bool, seed: int, batch_size: int = 0
    ) -> DataLoader:
        size = batch_size or self.cfg.train.batch_size
        return make_loader(ds, size, shuffle, seed, 0, collator=self.collator(tokenizer))

    def distributions(self, output: Any, batch: dict[str, Tensor]) -> list[Distribution]:
        if self.task.kind == "regression":
            raise ConfigError(
                f"task {self.task.name!r} is a {self.task.kind} task: it has no class "
                "distribution to distil"
            )
        return [Distribution(output.logits.float())]

    def eval_loaders(self, tokenizer: Any) -> dict[str, DataLoader]:
        """One loader per eval split (built once per tokenizer)."""
        if self._evals is None or self._evals[0] != id(tokenizer):
            loaders = {
                split: self.loader(
                    self.encode(examples, tokenizer),
                    tokenizer,
                    shuffle=False,
                    seed=self.cfg.seed,
                    batch_size=self.cfg.train.eval_batch_size,
                )  # fmt: skip
                for split, examples in self.task.eval.items()
            }
            self._evals = (id(tokenizer), loaders)
        return self._evals[1]

    def evaluate(self, model: Any, tokenizer: Any) -> Evaluation:
        result = evaluate(model, self.task, self.eval_loaders(tokenizer), self.cfg.train.precision)
        return Evaluation({**result.metrics, "loss": result.loss}, predictions=result.predictions)

    def save_outputs(self, run_dir: str | Path, evaluation: Evaluation) -> None:
        pass


class GenerationAdapter:
    """Prompt -> completion with a causal LM; scored by beam search."""

    token_level = True

    def __init__(self, task: Task, cfg: Config) -> None:
        from cotune.data.e2e_metrics import check_metric_packages

        check_metric_packages(cfg.generation.metrics)  # before training, not after it
        self.task = task
        self.cfg = cfg

    def build_model(
        self, model_cfg: ModelConfig | None = None, seed: int | None = None
    ) -> tuple[nn.Module, Any]:
        model, tokenizer, _ = build_lm(
            model_cfg or self.cfg.model,
            seed=self.cfg.seed if seed is None else seed,
            label_smoothing=self.cfg.train.label_smoothing,
        )
        return model, tokenizer

    def encode(self, examples: list[Example], tokenizer: Any) -> Encoded:
        return encode_pairs(examples, tokenizer, self.cfg.train.max_seq_len)

    def collator(self, tokenizer: Any) -> Collator:
        return PairCollator(int(tokenizer.pad_token_id))

    def loader(
        self, ds: Encoded, tokenizer: Any, *, shuffle: bool, seed: int, batch_size: int = 0
    ) -> DataLoader:
        size = batch_size or self.cfg.train.batch_size
        return pair_loader(ds, size, shuffle, seed, int(tokenizer.pad_token_id))

    def distributions(self, output: Any, batch: dict[str, Tensor]) -> list[Distribution]:
        raise ConfigError(
            f"task {self.task.name!r} is a generation task: distilling its token "
            "distributions is not supported"
        )

    def evaluate(self, model: Any, tokenizer: Any) -> Evaluation:
        metrics, texts = evaluate_generation(
            generation_model(model), tokenizer, self.task, self.cfg.generation
        )
        return Evaluation(metrics, texts, generation_records(texts, self.task))

    def save_outputs(self, run_dir: str | Path, evaluation: Evaluation) -> None:
        write_generations(run_dir, self.task, evaluation.outputs)


class QAAdapter:
    """Extractive QA: a span head on an encoder, context windows, SQuAD EM / F1."""

    token_level = True

    def __init__(self, task: Task, cfg: Config) -> None:
        self.task = task
        self.cfg = cfg
        self._evals: tuple[int, dict[str, QASplit]] | None = None

    def build_model(
        self, model_cfg: ModelConfig | None = None, seed: int | None = None
    ) -> tuple[nn.Module, Any]:
        model, tokenizer, _ = build_span_model(
            model_cfg or self.cfg.model, seed=self.cfg.seed if seed is None else seed
        )
        return model, tokenizer

    def encode(self, examples: list[Example], tokenizer: Any) -> Encoded:
        return encode_qa(examples, tokenizer, self.cfg.train.max_seq_len, self.cfg.task.doc_stride)

    def collator(self, tokenizer: Any) -> Collator:
        return PadCollator(tokenizer.pad_token_id)

    def loader(
        self, ds: Encoded, tokenizer: Any, *, shuffle: bool, seed: int, batch_size: int = 0
    ) -> DataLoader:
        size = batch_size or self.cfg.train.batch_size
        return make_loader(ds, size, shuffle, seed, 0, collator=self.collator(tokenizer))

    def distributions(self, output: Any, batch: dict[str, Tensor]) -> list[Distribution]:
        """The start and the end distribution over each feature's tokens (not padding)."""
        mask = batch["attention_mask"].bool()
        return [
            Distribution(output.start_logits.float(), mask),
            Distribution(output.end_logits.float(), mask),
        ]

    def eval_splits(self, tokenizer: Any) -> dict[str, QASplit]:
        """Each eval split's questions, features and batches (built once per tokenizer)."""
        if self._evals is None or self._evals[0] != id(tokenizer):
            splits: dict[str, QASplit] = {}
            for split, examples in self.task.eval.items():
                questions = [ex for ex in examples if isinstance(ex, QAExample)]
                features = encode_qa(questions, tokenizer, self.cfg.train.max_seq_len,
                                     self.cfg.task.doc_stride)  # fmt: skip
                loader = self.loader(features, tokenizer, shuffle=False, seed=self.cfg.seed,
                                     batch_size=self.cfg.train.eval_batch_size)  # fmt: skip
                splits[split] = QASplit(questions, features, loader)
            self._evals = (id(tokenizer), splits)
        return self._evals[1]

    def evaluate(self, model: Any, tokenizer: Any) -> Evaluation:
        result = evaluate_qa(
            model, self.eval_splits(tokenizer), self.cfg.train.precision,
            max_answer_len=self.cfg.task.max_answer_len,
        )  # fmt: skip
        return Evaluation({**result.metrics, "loss": result.loss}, predictions=result.predictions)

    def save_outputs(self, run_dir: str | Path, evaluation: Evaluation) -> None:
        pass  # the answers are in predictions.jsonl


class ImageAdapter(ClassificationAdapter):
    """Image classification: a classifier on an image model (ViT, DINOv2) over
    `pixel_values`; images resized once to `task.image_size`, scored as classification."""

    def __init__(self, task: Task, cfg: Config) -> None:
        super().__init__(task, cfg)
        geometry = image_geometry(cfg.model.name)
        size = cfg.task.image_size
        if geometry.fixed_size is not None and size != geometry.fixed_size:
            raise ConfigError(
                f"model {cfg.model.name!r} takes {geometry.fixed_size}x{geometry.fixed_size} "
                f"images only: set task.image_size = {geometry.fixed_size}"
            )
        if size % geometry.patch_size:
            below = max(size // geometry.patch_size, 1) * geometry.patch_size
            raise ConfigError(
                f"task.image_size = {size} is not a multiple of model {cfg.model.name!r}'s "
                f"patch size {geometry.patch_size}: use e.g. {below} or "
                f"{below + geometry.patch_size}"
            )
        self.channels = geometry.channels

    def build_model(
        self, model_cfg: ModelConfig | None = None, seed: int | None = None
    ) -> tuple[nn.Module, Any]:
        model, tokenizer, _ = build_classifier(
            model_cfg or self.cfg.model,
            self.task.num_labels,
            problem="classification",
            label_smoothing=self.cfg.train.label_smoothing,
            seed=self.cfg.seed if seed is None else seed,
        )
        return model, tokenizer

    def encode(self, examples: list[Example], tokenizer: Any) -> Encoded:
        return encode_images(examples, self.cfg.task.image_size)

    def collator(self, tokenizer: Any) -> Collator:
        return ImageCollator(self.channels)


ADAPTERS: dict[
    str,
    type[ClassificationAdapter] | type[GenerationAdapter] | type[QAAdapter] | type[ImageAdapter],
] = {
    "classification": ClassificationAdapter,
    "regression": ClassificationAdapter,
    "generation": GenerationAdapter,
    "qa": QAAdapter,
    "image-classification": ImageAdapter,
}


def adapter_for(task: Task, cfg: Config) -> TaskAdapter:
    """The adapter for `task.kind`."""
    if task.kind not in ADAPTERS:
        raise ConfigError(
            f"task {task.name!r} is of kind {task.kind!r}, which no method can train yet; "
            f"kinds with an adapter: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[task.kind](task, cfg)
