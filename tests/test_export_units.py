"""`cotune.export` in this process, on every model family: the transformers classifier
class computes what cotune's classifier computes, SFT factors fold back into the dense
matrix they factorise, a bf16 / int8 base exports the weights the run computed with,
and what a run folder must hold to be exported. (Loading an export without cotune, in
a fresh process, is tests/test_export.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import batch_for, tiny_cfg
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor

from cotune.config import build_config
from cotune.data import Task
from cotune.data.images import ImageCollator, resize
from cotune.errors import ExportError
from cotune.export import image_processor
from cotune.export.build import build_export, hf_classifier
from cotune.export.modeling_cotune_classifier import (
    CotuneForQuestionAnswering,
    CotuneForSequenceClassification,
)
from cotune.export.state import TrainedState, pop_sft_factors, read_trained_state
from cotune.methods.split import build_split
from cotune.models import adapter_state_dict, build_classifier, unwrap
from cotune.models.span import build_span_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["bert", "roberta", "distilbert", "llama", "gemma3", "gpt2", "vit", "dinov2"]


def _task(num_labels: int = 3, family: str = "bert") -> Task:
    names = [f"class-{i}" for i in range(num_labels)]
    kind = "image-classification" if family in ("vit", "dinov2") else "classification"
    return Task("toy", kind, num_labels, names, [], {}, "accuracy")


def _inputs(family: str) -> dict[str, torch.Tensor]:
    batch = batch_for(family)
    batch.pop("labels")
    return batch


def _perturb(params: list[torch.nn.Parameter], seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_transformers_classifier_computes_what_cotunes_computes(family: str) -> None:
    cfg = tiny_cfg(family)
    model, _, _ = build_classifier(cfg.model, 3, seed=0)
    _perturb(list(model.parameters()))  # no weight keeps its initial value
    hf = hf_classifier(unwrap(model), _task())
    assert isinstance(hf, CotuneForSequenceClassification)
    assert hf.config.id2label == {0: "class-0", 1: "class-1", 2: "class-2"}
    x = _inputs(family)
    with torch.no_grad():
        assert torch.equal(hf(**x).logits, model(**x).logits)


def test_a_regression_head_exports_one_output() -> None:
    cfg = build_config({"model": {"name": "tiny-roberta"}})
    model, _, _ = build_classifier(cfg.model, 1, problem="regression", seed=0)
    _perturb(list(model.parameters()))
    task = Task("glue/stsb", "regression", 1, ["similarity"], [], {}, "pearson")
    hf = hf_classifier(unwrap(model), task)
    assert hf.config.num_labels == 1 and hf.config.problem_type == "regression"
    assert hf.config.id2label == {0: "similarity"}
    x = _inputs("roberta")
    labels = torch.tensor([0.5, 3.0, 4.5])
    with torch.no_grad():
        got, want = hf(**x, labels=labels), model(**x, labels=labels)
    assert got.logits.shape == (3, 1) and torch.equal(got.logits, want.logits)
    assert torch.equal(got.loss, want.loss)  # MSE, as cotune trains it


def test_a_span_extractor_exports_as_question_answering() -> None:
    cfg = build_config({"model": {"name": "tiny-bert"}})
    model, _, _ = build_span_model(cfg.model, seed=0)
    _perturb(list(model.parameters()))
    task = Task("squad", "qa", 2, [], [], {}, "f1")
    hf = hf_classifier(unwrap(model), task)
    assert isinstance(hf, CotuneForQuestionAnswering)
    assert hf.config.auto_map["AutoModelForQuestionAnswering"].endswith(
        "CotuneForQuestionAnswering"
    )
    x = _inputs("bert")
    with torch.no_grad():
        got, want = hf(**x), model(**x)
    assert torch.equal(got.start_logits, want.start_logits)
    assert torch.equal(got.end_logits, want.end_logits)


def test_the_image_processor_prepares_images_as_cotunes_tasks_do(tmp_path: Path) -> None:
    image_processor(3, 28).save_pretrained(str(tmp_path))
    processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    rng = np.random.default_rng(0)
    for shape in [(60, 45, 3), (30, 30)]:  # RGB, and grey (given to it as RGB)
        pixels = (rng.random(shape) * 255).astype("uint8")
        ours = ImageCollator(3)([{"pixels": torch.from_numpy(resize(pixels, 28)), "labels": 0}])
        theirs = processor(Image.fromarray(pixels).convert("RGB"), return_tensors="pt")
        torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"])


def _split_state(cfg, family: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # type: ignore[no-untyped-def]
    """A trained split model's saved tensors (the uncut names, SFT factors included)
    and its logits on a batch through device -> cloud -> head."""
    split, _ = build_split(cfg, 3, "classification")
    modules = split.device_modules() + split.cloud_modules()
    for module in modules:
        module.eval()  # peft adds LoRA dropout layers in training mode
    named = split.named_trainable(modules)
    _perturb(list(named.values()))
    x = _inputs(family)
    with torch.no_grad():
        logits = split.head(split.cloud(*split.device(**x))).logits
    return {n: p.detach().clone() for n, p in named.items()}, logits


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_factors_fold_into_the_dense_ffn_matrix(family: str, lora: bool) -> None:
    model = {"lora": {"r": 4, "alpha": 8}} if lora else {}
    cfg = tiny_cfg(family, link={"codec": "sft", "rank": 6}, model=model)
    state, expected = _split_state(cfg, family)
    sft_names = [n for n in state if ".sft." in n]
    assert {n.rsplit(".", 1)[1] for n in sft_names} >= {"V", "S", "U"}
    if family == "vit":
        cfg.task.image_size = 28  # tiny-vit's only resolution (the image adapter checks it)
    exported = build_export(cfg, _task(family=family), TrainedState(state, ["test"]))
    assert exported.lora is lora
    assert any("folded" in note for note in exported.notes)
    with torch.no_grad():
        logits = exported.model(**_inputs(family)).logits
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    # the rank-6 matrix replaced the pretrained one: a fold into the wrong rows or
    # module would not give the split model's logits
    assert not torch.allclose(logits, _split_state(tiny_cfg(family, model=model), family)[1])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_factors_fold_into_a_span_extractor(lora: bool) -> None:
    model = {"lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"]}} if lora else {}
    cfg = tiny_cfg("bert", link={"codec": "sft", "rank": 6}, model=model)
    split, _ = build_split(cfg, 2, "span")
    modules = split.device_modules() + split.cloud_modules()
    for module in modules:
        module.eval()
    named = split.named_trainable(modules)
    _perturb(list(named.values()))
    x = _inputs("bert")
    with torch.no_grad():
        want = split.head(split.cloud(*split.device(**x)))
    state = {n: p.detach().clone() for n, p in named.items()}
    task = Task("squad", "qa", 2, [], [], {}, "f1")
    exported = build_export(cfg, task, TrainedState(state, ["test"]))
    assert isinstance(unwrap(exported.model), CotuneForQuestionAnswering)
    assert any("folded" in note for note in exported.notes)
    with torch.no_grad():
        got = exported.model(**x)
    torch.testing.assert_close(got.start_logits, want.start_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.end_logits, want.end_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("base_dtype", ["bf16", "int8"])
def test_a_low_precision_base_exports_the_weights_the_run_computed_with(base_dtype: str) -> None:
    cfg = build_config(
        {"model": {"name": "tiny-llama", "lora": {"r": 4}, "base_dtype": base_dtype}}
    )
    model, _, _ = build_classifier(cfg.model, 3, seed=0)
    model.eval()  # peft adds LoRA dropout layers in training mode
    trainable = [p for p in model.parameters() if p.requires_grad]
    _perturb(trainable)
    state = adapter_state_dict(model)
    exported = build_export(cfg, _task(), TrainedState(state, ["test"]))
    x = _inputs("llama")
    with torch.no_grad():
        got, want = exported.model(**x).logits, model(**x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fp32 = build_export(
        build_config({"model": {"name": "tiny-llama", "lora": {"r": 4}}}), _task(),
        TrainedState(state, ["test"]),
    )  # fmt: skip
    with torch.no_grad():
        assert not torch.allclose(fp32.model(**x).logits, want, atol=1e-5)


def test_a_state_that_does_not_match_the_config_is_refused() -> None:
    cfg = build_config({"model": {"name": "tiny-bert", "lora": {"r": 4}}})
    model, _, _ = build_classifier(cfg.model, 3, seed=0)
    state = adapter_state_dict(model)
    other = build_config({"model": {"name": "tiny-bert", "lora": {"r": 2}}})
    with pytest.raises(ExportError, match="shape"):
        build_export(other, _task(), TrainedState(state, ["test"]))
    state.pop(next(iter(state)))
    with pytest.raises(ExportError, match="missing 1"):
        build_export(cfg, _task(), TrainedState(state, ["test"]))


def test_a_device_half_alone_says_where_the_cloud_half_is() -> None:
    cfg = tiny_cfg("bert")
    split, _ = build_split(cfg, 3, "classification")
    device = {n: p.detach() for n, p in split.named_trainable(split.device_modules()).items()}
    with pytest.raises(ExportError, match="cotune cloud --out"):
        build_export(cfg, _task(), TrainedState(device, ["test"], cloud_missing=True))


def test_run_folder_files_and_sft_factor_names(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="holds no saved weights"):
        read_trained_state(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "device_trainable.safetensors"))
    assert read_trained_state(tmp_path).cloud_missing
    (tmp_path / "cloud").mkdir()
    save_file({"b": torch.ones(2)}, str(tmp_path / "cloud" / "cloud_trainable.safetensors"))
    state = read_trained_state(tmp_path)
    assert not state.cloud_missing and set(state.tensors) == {"a", "b"}
    (tmp_path / "trainable.safetensors").write_text("not safetensors")
    (tmp_path / "device_trainable.safetensors").unlink()
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        read_trained_state(tmp_path)
    tensors = {"x.layer.2.sft.V": torch.zeros(1), "x.layer.2.sft.S": torch.zeros(1),
               "x.layer.2.sft.U": torch.zeros(1), "x.head.weight": torch.zeros(1)}  # fmt: skip
    assert set(pop_sft_factors(tensors)) == {"x.layer.2"}
    assert set(tensors) == {"x.head.weight"}
    with pytest.raises(ExportError, match="lack U"):
        pop_sft_factors({"y.sft.V": torch.zeros(1), "y.sft.S": torch.zeros(1)})
