"""Exporting a run's trained model as a folder the ecosystem's standard calls load.

`export_model(run_dir, cfg)` reads what the run saved (`state.py`), rebuilds the model
as transformers / peft objects (`build.py`) and writes `RUN_DIR/model/`:

- under LoRA: a peft adapter (`adapter_config.json`, `adapter_model.safetensors`: the
  LoRA matrices and the trained head) whose `base_model_name_or_path` names the base
  model folder: `model/base/` (classifiers, and models without a folder of their own:
  tiny ones, a bf16 / int8 base), or the causal LM's own folder (a zoo model's
  converted copy in `~/.cache/cotune`, a local folder, or a hub id). `merge=True`
  merges the adapter into the base weights and writes one model instead;
- under full fine-tuning: the model (`save_pretrained`);
- always the tokenizer (an image processor for image models), `README.md` (how to
  load it) and `cotune_export.json` (what was exported, from which files, and notes).

Classifiers are written as transformers custom code: `modeling_cotune_classifier.py`
next to `config.json`, whose `auto_map` names its classes, so
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`
builds the same base model, pooling and head without cotune (transformers' own
`*ForSequenceClassification` classes pool differently: BERT's pooler on the first
token, Llama's unbiased `score` on the last non-pad id).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.config import Config
from cotune.data import load_task
from cotune.data.pairs import PROMPT_SUFFIX, bos_prefix, eos_id
from cotune.errors import ExportError
from cotune.export.build import ExportModel, build_export
from cotune.export.state import read_trained_state
from cotune.models import resolve

MODEL_DIR = "model"
BASE_DIR = "base"
RECORD_FILE = "cotune_export.json"
LOSSLESS_CODECS = ("identity",)

__all__ = ["BASE_DIR", "MODEL_DIR", "RECORD_FILE", "Export", "export_model", "image_processor"]


@dataclass
class Export:
    """What `export_model` wrote: the folder, its format ("peft-adapter" or
    "transformers"), the base model folder or hub id an adapter applies to, and notes."""

    path: Path
    format: str
    base: str | None = None
    notes: list[str] = field(default_factory=list)


AUTO_CLASS = {
    "sequence": "AutoModelForSequenceClassification",
    "image": "AutoModelForImageClassification",
    "span": "AutoModelForQuestionAnswering",
    "causal": "AutoModelForCausalLM",
}


def _link_notes(cfg: Config) -> list[str]:
    """Why a split run's predictions.jsonl may differ from the exported model's."""
    if cfg.method not in ("split", "splitfed"):
        return []
    lossy = cfg.link.codec not in LOSSLESS_CODECS and not (
        cfg.link.codec == "sft" and cfg.link.code_format == "fp32"
    )
    if not lossy:
        return []
    what = f"codec {cfg.link.codec!r}" + (
        f" (code_format {cfg.link.code_format!r})" if cfg.link.codec in ("pca", "sft") else ""
    )
    return [
        f"the run scored its predictions through the link ({what} at the cut); this model "
        "runs whole, without the cut's compression, so its predictions can differ from "
        "predictions.jsonl"
    ]


def image_processor(channels: int, size: int) -> Any:
    """A transformers image processor that resizes (Pillow, bilinear) and normalises as
    cotune's image tasks do: give it RGB images (grey ones for a 1-channel model)."""
    import transformers

    from cotune.data.images import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD

    # the Pillow implementation (cotune resizes with Pillow); older transformers name it
    # ViTImageProcessor
    processor: Any
    if hasattr(transformers, "ViTImageProcessorPil"):
        processor = transformers.ViTImageProcessorPil
    else:
        processor = transformers.ViTImageProcessor
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    return processor(
        do_resize=True, size={"height": size, "width": size}, resample=2,  # bilinear
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(mean), image_std=list(std),
    )  # fmt: skip


def _save_preprocessing(model: ExportModel, hf: Any, cfg: Config, folder: Path) -> None:
    """The tokenizer, or for an image model its image processor."""
    if model.tokenizer is not None:
        # cotune may drop token_type_ids from a tokenizer's outputs (a decoder with a
        # WordPiece tokenizer): the saved tokenizer keeps that
        model.tokenizer.init_kwargs["model_input_names"] = list(model.tokenizer.model_input_names)
        model.tokenizer.save_pretrained(str(folder))
        return
    channels = int(hf.config.base_model_config.get("num_channels", 3))
    image_processor(channels, cfg.task.image_size).save_pretrained(str(folder))


def _base_reference(cfg: Config, model: ExportModel) -> str | None:
    """A folder or hub id that loads as the base of a causal LM's adapter, if the run's
    base is one unchanged (zoo models converted in the cache, local folders, hub ids)."""
    if model.kind != "causal" or cfg.model.base_dtype != "fp32":
        return None
    source = resolve(cfg.model.name)
    if source.path is None:
        return None
    return source.path if source.origin == "HF hub" else str(Path(source.path).resolve())


def _readme(export: Export, model: ExportModel) -> str:
    """README.md: how to load this folder, with transformers (and peft) only."""
    auto = AUTO_CLASS[model.kind]
    remote = model.kind != "causal"
    trust = ", trust_remote_code=True" if remote else ""
    lines = ["# Exported by cotune", "", f"Format: {export.format}.", ""]
    if remote:
        lines += [
            "The model is transformers custom code (`modeling_cotune_classifier.py`, named by",
            "`auto_map` in config.json): the base model, cotune's pooling and a linear head.",
            "It loads with `trust_remote_code=True`; cotune is not needed.",
            "",
        ]
    pre, var = (
        ("AutoTokenizer", "tokenizer") if model.tokenizer is not None
        else ("AutoImageProcessor", "processor")
    )  # fmt: skip
    lines += ["```python", f"from transformers import {pre}, {auto}"]
    if export.format == "peft-adapter":
        lines += [
            "from peft import PeftModel",
            "",
            f'base = {auto}.from_pretrained("{export.base}"{trust})',
            f'model = PeftModel.from_pretrained(base, "{export.path}")',
        ]
    else:
        lines += ["", f'model = {auto}.from_pretrained("{export.path}"{trust})']
    lines += [f'{var} = {pre}.from_pretrained("{export.path}")', "```", ""]
    if model.kind == "causal":
        fmt = prompt_format(model.tokenizer)
        lines += [
            f"Prompts as cotune's generation tasks make them: the input text + {fmt['suffix']!r},",
            "tokenised with `add_special_tokens=False`"
            + (f", after BOS ({fmt['bos_token_id']})" if fmt["bos_token_id"] is not None else "")
            + f"; a completion ends with token {fmt['eos_token_id']} (`eos_token_id`).",
            "",
        ]
    if export.notes:
        lines += ["Notes:", "", *(f"- {note}" for note in export.notes), ""]
    return "\n".join(lines)


def _write(model: ExportModel, cfg: Config, tmp: Path, final: Path, merge: bool) -> Export:
    """Write `model` into `tmp` (renamed to `final` by the caller)."""
    notes = [*model.notes, *_link_notes(cfg)]
    peft_model: Any = model.model
    if model.base_state is not None and not merge:
        base_ref = _base_reference(cfg, model)
        write_base = base_ref is None
        if base_ref is None:
            base_ref = str((final / BASE_DIR).resolve())
        peft_model.peft_config["default"].base_model_name_or_path = base_ref
        # (cotune never resizes the vocabulary: no embedding layers to save in full)
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        if write_base:
            # the model peft wraps, without the adapter: `unload` takes the LoRA layers
            # out (merging nothing) and leaves the trained copies of modules_to_save,
            # which the base's own weights replace
            base = peft_model.unload()
            base.load_state_dict(model.base_state, strict=True)
            base.save_pretrained(str(tmp / BASE_DIR))
            _save_preprocessing(model, base, cfg, tmp / BASE_DIR)
        else:
            base = peft_model.get_base_model()
        export = Export(final, "peft-adapter", base_ref, notes)
    else:
        base = peft_model.merge_and_unload() if model.lora else peft_model
        if model.lora:
            notes.append("the LoRA adapter is merged into the base weights")
        elif merge:
            notes.append("nothing to merge: every weight was fine-tuned")
        base.save_pretrained(str(tmp))
        export = Export(final, "transformers", None, notes)
    _save_preprocessing(model, base, cfg, tmp)
    (tmp / "README.md").write_text(_readme(export, model))
    return export


def prompt_format(tokenizer: Any) -> dict[str, Any]:
    """How cotune's generation tasks turn an input into a prompt, and end a completion."""
    bos = bos_prefix(tokenizer)
    return {
        "bos_token_id": bos[0] if bos else None,  # put first when not None
        "suffix": PROMPT_SUFFIX,  # appended to the input text
        "add_special_tokens": False,  # the text is tokenised without them
        "eos_token_id": eos_id(tokenizer),  # what ends a completion
    }


def _record(export: Export, cfg: Config, files: list[str], model: ExportModel) -> dict[str, Any]:
    record: dict[str, Any] = {
        "format": export.format,
        "auto_class": AUTO_CLASS[model.kind],
        "trust_remote_code": model.kind != "causal",
        "base_model_name_or_path": export.base,
        "method": cfg.method,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "from_files": files,
        "notes": export.notes,
    }
    if model.kind == "causal":
        record["prompt_format"] = prompt_format(model.tokenizer)
    return record


@contextmanager
def _no_shard_bars() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar for every `save_pretrained`, even
    with one shard; an export is one quick step of a run (and `--quiet` means quiet)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def export_model(
    run_dir: str | Path, cfg: Config, *, out: str | Path | None = None, merge: bool = False
) -> Export:
    """Export the model the run in `run_dir` (whose config is `cfg`) trained into `out`
    (default `run_dir/model`, replaced if it exists); see the module doc."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"run folder {run} does not exist")
    trained = read_trained_state(run)
    task = load_task(cfg.task, cfg.seed, require_train=False)
    model = build_export(cfg, task, trained)
    final = (Path(out) if out is not None else run / MODEL_DIR).resolve()
    replaceable = (final / RECORD_FILE).is_file() or (final.is_dir() and not any(final.iterdir()))
    if final.exists() and not replaceable:
        raise ExportError(
            f"{final} exists and is not a cotune export (it has no {RECORD_FILE}): give "
            "--out a new folder, or an earlier export to replace"
        )
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with _no_shard_bars():
            export = _write(model, cfg, tmp, final, merge)
        record = _record(export, cfg, trained.files, model)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return export
