"""A run's trained model, rebuilt as transformers (and peft) objects.

`build_export(cfg, task, trained)` builds the model the run trained the way the run
built it (the task adapter's `build_model`, the same seed), as a transformers
`PreTrainedModel`:

- classifiers (text, image) and span extractors become `CotuneForSequenceClassification`
  / `CotuneForQuestionAnswering` (`modeling_cotune_classifier.py`: the same base
  model, pooling and head under the same module names);
- causal LMs are their own transformers class (LlamaForCausalLM, Gemma3ForCausalLM, ...).

Under LoRA it is wrapped by peft with the run's LoRA settings (`cotune.models.apply_lora`,
with the peft task type a standard loader expects), and the frozen base holds what the
run computed with: with `model.base_dtype = "bf16" / "int8"` every weight the run stored
rounded is the rounded value, in fp32. Then the trained tensors are loaded, and a split
run's SFT factors are folded back into the dense matrix they factorise (`fold_sft`; a
`modules_to_save` copy under LoRA), in a layer that, as the split model did, has no
residual connection around its FFN (`config.no_ffn_residual_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from cotune.config import Config
from cotune.data import Task
from cotune.errors import ExportError
from cotune.export.modeling_cotune_classifier import (
    CotuneClassifierConfig,
    CotuneForQuestionAnswering,
    CotuneForSequenceClassification,
    CotunePreTrainedModel,
)
from cotune.export.state import TrainedState, pop_sft_factors
from cotune.models import SequenceClassifier, apply_lora, resolve
from cotune.models.base_dtype import FrozenEmbedding, FrozenLinear, apply_base_dtype
from cotune.models.causal_lm import CompletionLM
from cotune.models.lora import describe_mismatch
from cotune.models.span import SpanExtractor
from cotune.training import adapter_for

# The first FFN matrix of a layer (what SFT factorises; `cotune.models.cut`), by family:
# its module(s) under the layer, their rows stacked in this order (Llama: gate, then up).
FFN_IN: dict[str, tuple[str, ...]] = {
    "bert": ("intermediate.dense",),
    "roberta": ("intermediate.dense",),
    "distilbert": ("ffn.lin1",),
    "llama": ("mlp.gate_proj", "mlp.up_proj"),
    "gemma3": ("mlp.gate_proj", "mlp.up_proj"),
    "gpt2": ("mlp.c_fc",),
    "vit": ("mlp.fc1",),
    "dinov2": ("mlp.fc1",),
}
PEFT_PREFIX = "base_model.model."
PEFT_TASK = {"sequence": "SEQ_CLS", "image": "SEQ_CLS", "span": "QUESTION_ANS",
             "causal": "CAUSAL_LM"}  # fmt: skip
_CLASSIFIER = {
    "AutoModelForSequenceClassification": "CotuneForSequenceClassification",
    "AutoModelForImageClassification": "CotuneForSequenceClassification",
}
# kind -> the auto classes config.json's auto_map names (the first: the kind's own)
AUTO_CLASSES = {
    "sequence": _CLASSIFIER,
    "image": dict(reversed(_CLASSIFIER.items())),
    "span": {"AutoModelForQuestionAnswering": "CotuneForQuestionAnswering"},
}
MODELING_MODULE = "modeling_cotune_classifier"


@dataclass
class ExportModel:
    """The rebuilt model: `model` (a PreTrainedModel, or a peft model around one under
    LoRA), its `kind` ("sequence", "image", "span" or "causal"), the tokenizer (None for image
    models), under LoRA the base's own weights (`base_state`: what the adapter applies
    to), and notes for the export's record."""

    model: nn.Module
    kind: str
    tokenizer: Any
    base_state: dict[str, Tensor] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def lora(self) -> bool:
        return self.base_state is not None

    def hf_model(self) -> PreTrainedModel:
        """The transformers model (under peft: the model peft wraps)."""
        inner = self.model.get_base_model() if self.lora else self.model  # type: ignore[operator]
        assert isinstance(inner, PreTrainedModel)
        return inner


def label_kwargs(task: Task) -> dict[str, Any]:
    """`num_labels`, `id2label` / `label2id` and `problem_type` for the config."""
    if task.kind == "qa":
        return {"num_labels": 2, "id2label": {0: "start", 1: "end"}}
    if task.kind == "regression" or task.num_labels == 1:
        names = task.label_names[:1] or ["score"]
        return {"num_labels": 1, "id2label": {0: names[0]}, "label2id": {names[0]: 0},
                "problem_type": "regression"}  # fmt: skip
    names = (
        list(task.label_names)
        if len(task.label_names) == task.num_labels
        else [f"LABEL_{i}" for i in range(task.num_labels)]
    )
    return {
        "num_labels": task.num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": "single_label_classification",
    }


def classifier_kind(clf: SequenceClassifier, task: Task) -> str:
    if isinstance(clf, SpanExtractor):
        return "span"
    return "image" if task.kind == "image-classification" else "sequence"


def hf_classifier(
    clf: SequenceClassifier, task: Task, no_ffn_residual: list[int] | None = None
) -> CotunePreTrainedModel:
    """`clf` (a SequenceClassifier or SpanExtractor) as the transformers class of
    `modeling_cotune_classifier`, with the same weights (copied); the layers in
    `no_ffn_residual` (a split run's SFT layer) lose their FFN residual."""
    span = isinstance(clf, SpanExtractor)
    kind = classifier_kind(clf, task)
    base = clf.backbone.config.to_diff_dict()
    for key in ("id2label", "label2id", "num_labels", "problem_type", "architectures"):
        base.pop(key, None)  # a base model's own head settings: not this model's
    config = CotuneClassifierConfig(
        base_model_config=base,
        pooling=clf.pooling,
        classifier_dropout=float(clf.dropout.p),
        use_token_type_ids=bool(clf.uses_token_type_ids),
        label_smoothing=float(clf.label_smoothing),
        no_ffn_residual_layers=no_ffn_residual,
        **label_kwargs(task),
    )
    config.auto_map = {
        "AutoConfig": f"{MODELING_MODULE}.CotuneClassifierConfig",
        **{auto: f"{MODELING_MODULE}.{cls}" for auto, cls in AUTO_CLASSES[kind].items()},
    }
    model_cls = CotuneForQuestionAnswering if span else CotuneForSequenceClassification
    # save_pretrained copies the modeling file next to config.json (custom code)
    model_cls.register_for_auto_class(next(iter(AUTO_CLASSES[kind])))
    model = model_cls(config)
    model.load_state_dict(clf.state_dict(), strict=True)
    return model.eval()


def _round_base(model: nn.Module, base_dtype: str) -> None:
    """Give every weight the run stored in `base_dtype` (bf16 / int8) the value it
    computed with, kept in fp32 in the stock module (Linear, Conv1D, Embedding)."""
    if base_dtype == "fp32":
        return
    stock = dict(model.named_modules())
    apply_base_dtype(model, base_dtype)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, FrozenLinear | FrozenEmbedding):
                continue
            old = stock[name]
            weight = module.dequantized_weight(torch.float32)
            old.weight.data = weight.t().contiguous() if isinstance(old, Conv1D) else weight
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, old)


def _trained_copy(module: nn.Module) -> nn.Module:
    """The module that trains: under peft's modules_to_save, its trained copy."""
    if isinstance(module, ModulesToSaveWrapper):
        trained: nn.Module = module.modules_to_save[str(module.active_adapter)]
        return trained
    return module


def fold_sft(model: nn.Module, layer: str, family: str, factors: dict[str, Tensor]) -> list[str]:
    """Write U diag(S) V (+ bias), the matrix the SFT factors of `layer` represent, into
    the layer's first FFN matrix (`FFN_IN`); returns the parameter names written."""
    if family not in FFN_IN:
        raise ExportError(f"cannot fold SFT factors of a {family} model")
    u, s, v = (factors[k].double() for k in ("U", "S", "V"))
    weight = (u * s) @ v  # [d_ff (stacked), d]
    bias = factors.get("bias")
    block = model.get_submodule(layer)
    written: list[str] = []
    row = 0
    with torch.no_grad():
        for rel in FFN_IN[family]:
            module = _trained_copy(block.get_submodule(rel))
            target, target_bias = module.weight, module.bias
            assert isinstance(target, Tensor)
            transposed = isinstance(module, Conv1D)  # GPT-2 stores [d, d_ff]
            rows = int(target.shape[1] if transposed else target.shape[0])
            part = weight[row : row + rows].to(target.dtype)
            target.copy_(part.t() if transposed else part)
            if bias is not None:
                if not isinstance(target_bias, Tensor):
                    raise ExportError(f"{layer}.{rel} has no bias for the SFT factors' bias")
                target_bias.copy_(bias[row : row + rows])
            row += rows
            prefix = next(n for n, m in model.named_modules() if m is module)
            written += [f"{prefix}.{n}" for n, _ in module.named_parameters()]
    if row != weight.shape[0]:
        raise ExportError(
            f"the SFT factors of {layer} give {weight.shape[0]} rows, its FFN has {row}"
        )
    return written


def _load_trained(
    model: nn.Module, tensors: dict[str, Tensor], *, may_lack: set[str], cloud_missing: bool
) -> None:
    """Copy `tensors` into the trainable parameters of `model` (names and shapes must
    be exactly those; parameters in `may_lack` may be absent: the folded SFT matrix)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unexpected = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors) - may_lack)
    if missing and cloud_missing:
        raise ExportError(
            "this run folder holds only the device's half of a split run (a device of a "
            "remote `cotune cloud`): copy the cloud's cloud_trainable.safetensors (from "
            "`cotune cloud --out`) into the run folder, then run `cotune export` on it"
        )
    if missing or unexpected:
        raise ExportError(
            "the saved weights do not match the model the run's config.toml builds: "
            + describe_mismatch(missing, unexpected)
            + ". Was config.toml changed after the run?"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ExportError(
                    f"the saved tensor {name} has shape {tuple(tensor.shape)}, the model "
                    f"built from config.toml {tuple(param.shape)}"
                )
            param.copy_(tensor.to(param.dtype))


def build_export(cfg: Config, task: Task, trained: TrainedState) -> ExportModel:
    """The model `trained` holds the weights of, as transformers (+ peft) objects."""
    tensors = dict(trained.tensors)
    sft = pop_sft_factors(tensors)
    plain_cfg = cfg.model.model_copy(update={"lora": None, "base_dtype": "fp32"})
    built, tokenizer = adapter_for(task, cfg).build_model(plain_cfg)
    family = resolve(cfg.model.name).family
    hf: PreTrainedModel
    if isinstance(built, CompletionLM):
        kind, prefix = "causal", "lm."
        assert isinstance(built.lm, PreTrainedModel)
        hf = built.lm
    elif isinstance(built, SequenceClassifier):
        kind, prefix = classifier_kind(built, task), ""
        cut_layers = [int(layer.rsplit(".", 1)[1]) for layer in sft]
        hf = hf_classifier(built, task, cut_layers)
    else:
        raise ExportError(f"cannot export a {type(built).__name__}")
    if sft and kind not in ("sequence", "image", "span"):
        raise ExportError("SFT factors can only be folded into a classifier or a span extractor")
    del built
    tensors = {n.removeprefix(prefix): t for n, t in tensors.items()}
    notes = list(trained.notes)
    model: nn.Module = hf
    base_state = None
    if cfg.model.lora is not None:
        # under LoRA every weight of the base is frozen: the run stored the same ones
        # in base_dtype as `apply_base_dtype` selects here
        hf.requires_grad_(False)
        _round_base(hf, cfg.model.base_dtype)
        if cfg.model.base_dtype != "fp32":
            notes.append(
                f"the frozen base holds the weights the run computed with (stored in "
                f"{cfg.model.base_dtype} during the run), in fp32"
            )
            if kind == "causal" and cfg.method == "splitfed" and hf.config.tie_word_embeddings:
                notes.append(
                    f"the devices looked tokens up in a {cfg.model.base_dtype} copy of the "
                    "token table; this model ties it to the LM head, which the cloud "
                    "computed with in fp32, and keeps it fp32 for both"
                )
        base_state = dict(hf.state_dict())  # peft keeps these tensors as the base's
        sft_modules = [
            f"{layer.removeprefix(PEFT_PREFIX)}.{rel}" for layer in sft for rel in FFN_IN[family]
        ]
        model = apply_lora(hf, cfg.model.lora, family, modules_to_save=("head", *sft_modules),
                           task_type=PEFT_TASK[kind])  # fmt: skip
    folded: set[str] = set()
    for layer in sft:
        folded.update(fold_sft(model, layer, family, sft[layer]))
        rank = sft[layer]["S"].numel()
        notes.append(
            f"split with the sft codec: the trained SVD factors of "
            f"{layer.removeprefix(PEFT_PREFIX)} (rank {rank}) are folded into its dense FFN "
            "input matrix, U diag(S) V; like the split model, that layer has no residual "
            "connection around its FFN (config.no_ffn_residual_layers)"
        )
    _load_trained(model, tensors, may_lack=folded, cloud_missing=trained.cloud_missing)
    model.eval()
    return ExportModel(model, kind, tokenizer, base_state, notes)
