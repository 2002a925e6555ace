"""Any transformers model: a save_pretrained folder of a model type outside the named
families trains whole (centralized, fedlora) with a generic family; methods that cut the
model or build a proxy of it refuse it with a user error naming the families they know;
what is neither a text encoder nor a causal LM is a clear error.

Every test here runs without the network: the DeBERTa-v2 and OPT models are tiny,
random and saved in the test, and `no_network` makes any connection to a non-loopback
address (and any hub probe) fail the test.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config, write_sst2
from torch import nn

from cotune import hub
from cotune.cli.main import main
from cotune.config import build_config
from cotune.config.schema import LoraConfig, MemoryConfig, ModelConfig
from cotune.errors import ConfigError, ModelError
from cotune.memory import apply_memory_option, checkpointed_layers, sparse_op_counts
from cotune.methods import resolve as resolve_config
from cotune.models import build_classifier, load_backbone, load_tokenizer, resolve
from cotune.models.causal_lm import build_lm
from cotune.models.classifier import takes_token_type_ids
from cotune.models.cut import FAMILY_OPS
from cotune.models.lora import unwrap
from cotune.models.zoo import load_causal_lm
from cotune.runtime.experiment import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail on any connection to a non-loopback address, and on any hub probe."""
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise AssertionError(f"a test tried to connect to {address}")
        return real_connect(self, address)

    def probe(endpoint: str = "") -> bool:
        raise AssertionError(f"a local model probed the hub ({endpoint})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(hub, "reachable", probe)
    # what the user's environment says about the hub must not decide these tests
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", hub.OFFLINE_FLAG):
        monkeypatch.delenv(var, raising=False)
    yield


def _deberta_folder(folder: Path, *, type_vocab_size: int = 0) -> Path:
    from transformers import DebertaV2Config, DebertaV2Model

    tokenizer = load_tokenizer("tiny-bert")  # the packaged minilm WordPiece tokenizer
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
        pad_token_id=tokenizer.pad_token_id, type_vocab_size=type_vocab_size,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        DebertaV2Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deberta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained DeBERTa-v2 (tiny, random) with a WordPiece tokenizer."""
    return _deberta_folder(tmp_path_factory.mktemp("deberta-v2"))


@pytest.fixture(scope="module")
def sst2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("data"), n_train=64, n_dev=16)


# ----------------------------------------------------------------------------- families


def test_a_deberta_folder_is_a_generic_encoder(deberta: Path) -> None:
    source = resolve(str(deberta))
    assert (source.family, source.model_type, source.origin) == (
        "encoder",
        "deberta-v2",
        "local folder",
    )


def test_the_generic_encoder_classifier_pools_the_mean_without_token_types(
    deberta: Path,
) -> None:
    model, tokenizer, _ = build_classifier(ModelConfig(name=str(deberta)), 3)
    assert model.pooling == "mean" and not model.uses_token_type_ids
    assert type(model.backbone).__name__ == "DebertaV2Model"
    batch = tokenizer(["a short one", "and a rather longer sentence"], padding=True)
    assert "token_type_ids" not in batch  # DeBERTa-v2's type_vocab_size is 0
    # padding does not change a row's logits: the mean pools real tokens only
    with torch.no_grad():
        both = model(**tokenizer(["a short one", "and a longer one too"], padding=True,
                                 return_tensors="pt")).logits  # fmt: skip
        alone = model(**tokenizer(["a short one"], return_tensors="pt")).logits
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)


def test_token_type_ids_go_only_to_a_forward_that_takes_several(tmp_path: Path) -> None:
    typed = _deberta_folder(tmp_path / "typed", type_vocab_size=2)
    model, tokenizer, _ = build_classifier(ModelConfig(name=str(typed)), 2)
    assert model.uses_token_type_ids
    assert "token_type_ids" in tokenizer(["a", "b"], ["c", "d"])

    class NoTypes(nn.Module):  # a config with 2 types, a forward without them
        config = type("Config", (), {"type_vocab_size": 2})()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids

    assert not takes_token_type_ids(NoTypes())


def test_lora_on_a_generic_encoder_targets_all_linear_and_trains_the_head_once(
    deberta: Path,
) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    model, tokenizer, _ = build_classifier(ModelConfig(name=str(deberta), lora=LoraConfig()), 3)
    clf = unwrap(model)
    linears = {
        n.rsplit(".", 1)[-1] for n, m in clf.backbone.named_modules() if isinstance(m, LoraLayer)
    }
    # every linear layer of the backbone: attention, its output, both FFN layers
    assert linears >= {"query_proj", "key_proj", "value_proj", "dense"}
    plain = load_backbone(str(deberta))
    n_linear = sum(isinstance(m, nn.Linear) for m in plain.modules())
    assert sum(isinstance(m, LoraLayer) for m in clf.backbone.modules()) == n_linear >= 2 * 6
    assert isinstance(clf.head, ModulesToSaveWrapper)
    assert not any(isinstance(m, LoraLayer) for m in clf.head.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [n for n in trainable if ".head." in n]
    assert sorted(n.rsplit(".", 1)[-1] for n in head) == ["bias", "weight"]
    assert all("lora_" in n for n in trainable if n not in head)
    batch = tokenizer(["good film", "bad film"], padding=True, return_tensors="pt")
    model.train()
    model(**batch, labels=torch.tensor([0, 2])).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_memory_option_does_not_need_a_family(deberta: Path) -> None:
    """Sparse saving and checkpointing act on module types (Linear, LayerNorm,
    transformers layers), so a generic encoder takes them too."""
    model, tokenizer, _ = build_classifier(ModelConfig(name=str(deberta), lora=LoraConfig()), 2)
    apply_memory_option(model, MemoryConfig(backward="random", keep=0.5, checkpoint=True))
    counts = sparse_op_counts(model)
    assert counts["linear"] > 0 and counts["layernorm"] > 0
    assert checkpointed_layers(model) == 2
    model.train()
    batch = tokenizer(["good film", "a bad film"], padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_centralized_trains_a_deberta_folder(
    deberta: Path, sst2: Path, tmp_path: Path, lora: bool
) -> None:
    model: dict[str, Any] = {"name": str(deberta)}
    if lora:
        model["lora"] = {"r": 4, "alpha": 8}
    cfg = resolve_config(
        build_config({
            "method": "centralized", "seed": 0,
            "task": {"name": "glue/sst2", "data_dir": str(sst2), "max_eval_examples": 16},
            "model": model,
            "train": {"steps": 4, "batch_size": 8, "max_seq_len": 24, "eval_every": 2,
                      "threads": 1},
        })
    )  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    assert summary["steps"] == 4
    built, _, _ = build_classifier(cfg.model, 2)
    total = sum(p.numel() for p in built.parameters())
    trainable = summary["trainable_params"]["device"]
    if lora:
        assert 0 < trainable < total / 5
    else:
        assert trainable == total
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]


def test_fedlora_trains_a_deberta_folder(deberta: Path, sst2: Path, tmp_path: Path) -> None:
    from cotune.runtime.federated.engine import run_federated

    cfg = tiny_config(
        sst2,
        model={"name": str(deberta)},
        federated={"clients": 2, "rounds": 2, "local_steps": 2},
        task={"max_eval_examples": 16},
    )
    assert cfg.model.lora is not None and cfg.model.lora.target_modules is None
    result = run_federated(cfg, tmp_path / "fed", engine="inline")
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    rounds = [
        json.loads(line) for line in (tmp_path / "fed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rounds] == [1, 2]
    assert result.bytes_up > 0 and result.bytes_down > 0


# ----------------------------------------------------------------------------- refusals


def _write_config(tmp_path: Path, method: str, model: str, sst2: Path) -> Path:
    path = tmp_path / f"{method}.toml"
    path.write_text(
        f'method = "{method}"\n[task]\nname = "glue/sst2"\ndata_dir = {json.dumps(str(sst2))}\n'
        f"[model]\nname = {json.dumps(model)}\n"
    )
    return path


def test_split_on_a_generic_model_exits_2_naming_the_families(
    deberta: Path, sst2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write_config(tmp_path, "split", str(deberta), sst2)
    code = main(["run", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.startswith("cotune: error:")
    assert "'deberta-v2' model (generic encoder family)" in err
    for family in FAMILY_OPS:
        assert f"{family} (" in err
    assert "centralized, fedavg, fedlora or fedkd" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_fedpft_and_splitfed_refuse_generic_models(deberta: Path, sst2: Path) -> None:
    base = {"task": {"name": "glue/sst2", "data_dir": str(sst2)}, "model": {"name": str(deberta)}}
    with pytest.raises(
        ConfigError,
        match=r"is an encoder model; proxies \(fedpft\) are built from bert, roberta, dinov2",
    ):
        resolve_config(build_config({"method": "fedpft", **base}))
    e2e = {"task": {"name": "e2e", "data_dir": str(sst2)},
           "model": {"name": str(deberta), "lora": {"r": 4}}}  # fmt: skip
    with pytest.raises(ModelError, match=r"splitfed .*llama \(llama.*gemma3.*gpt2 \(gpt2\)"):
        resolve_config(build_config({"method": "splitfed", **e2e}))


def test_a_generic_encoder_is_not_a_causal_lm(deberta: Path) -> None:
    with pytest.raises(ModelError, match="'deberta-v2' encoder, not a causal language model"):
        load_causal_lm(str(deberta))


def test_an_encoder_decoder_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelError) as err:
        resolve(str(tmp_path))
    message = str(err.value)
    assert "'t5' model, an encoder-decoder (sequence-to-sequence) model" in message
    assert "AutoModel" in message and "AutoModelForCausalLM" in message
    assert "dinov2" in message  # image families named too


def test_a_model_neither_encoder_nor_causal_lm_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(tmp_path)
    with pytest.raises(
        ModelError, match="'clip' model, which is neither a text encoder nor a causal LM"
    ):
        resolve(str(tmp_path))


def test_a_model_type_transformers_does_not_know_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(
        ModelError, match="'frobnicator' model, a model type this transformers does not know"
    ):
        resolve(str(tmp_path))


# ----------------------------------------------------------------------------- decoders


@pytest.fixture(scope="module")
def opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained OPT causal LM (tiny, random), a model type outside the zoo."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("opt")
    tokenizer = load_tokenizer("tiny-bert")
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
        num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        OPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_causal_lm_folder_is_a_generic_decoder(opt: Path) -> None:
    from peft.tuners.lora import LoraLayer

    source = resolve(str(opt))
    assert (source.family, source.model_type) == ("decoder", "opt")
    assert type(load_causal_lm(str(opt))).__name__ == "OPTForCausalLM"
    model, tokenizer, family = build_lm(ModelConfig(name=str(opt), lora=LoraConfig(r=2)), seed=0)
    assert family == "decoder"
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert any(n.endswith("q_proj") for n in wrapped) and any(n.endswith("fc2") for n in wrapped)
    assert not any(n.endswith("lm_head") for n in wrapped)  # peft's all-linear spares it
    batch = tokenizer(["red is a pub ."], return_tensors="pt")
    out = model(batch["input_ids"], batch["attention_mask"], labels=batch["input_ids"])
    assert out.loss is not None and out.loss.isfinite()
    # under a classifier head a decoder pools its last token
    clf, _, _ = build_classifier(ModelConfig(name=str(opt)), 2)
    assert clf.pooling == "last"


# ----------------------------------------------------------------------------- the hub


class _Recorder:
    """Stands in for `PretrainedConfig.get_config_dict`: records `local_files_only`
    and raises `error` (or returns `config`)."""

    def __init__(self, error: BaseException | None = None, config: dict | None = None) -> None:
        self.error, self.config = error, config
        self.local_only: list[bool] = []

    def __call__(self, name: str, **kwargs: Any) -> tuple[dict, dict]:
        self.local_only.append(bool(kwargs.get("local_files_only")))
        if self.error is not None:
            raise self.error
        assert self.config is not None
        return dict(self.config), {}


def _patch_hub(
    monkeypatch: pytest.MonkeyPatch, fake: _Recorder, reachable: bool | None
) -> list[str]:
    from transformers import PretrainedConfig

    probes: list[str] = []

    def probe(endpoint: str = "") -> bool:
        probes.append(endpoint)
        if reachable is None:
            raise AssertionError("the hub was probed although cotune is offline")
        return reachable

    monkeypatch.setattr(hub, "reachable", probe)
    monkeypatch.setattr(PretrainedConfig, "get_config_dict", fake)
    return probes


_CACHE_MISS = OSError("We couldn't connect to 'https://huggingface.co' to load the files")


@pytest.mark.parametrize(
    ("env", "because"),
    [({hub.OFFLINE_FLAG: "1", "HF_HUB_OFFLINE": "1"}, "--offline was given"),
     ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 was given")],
    ids=["--offline", "HF_HUB_OFFLINE"],
)  # fmt: skip
def test_offline_hub_id_says_it_was_the_users_choice(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], because: str
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    fake = _Recorder(_CACHE_MISS)
    _patch_hub(monkeypatch, fake, reachable=None)
    with pytest.raises(ModelError) as err:
        resolve("some-org/some-model")
    message = str(err.value)
    assert f"cotune is offline because {because}" in message
    assert "not in the local Hugging Face cache" in message
    assert "could not be reached" not in message
    assert fake.local_only == [True]


def test_unreachable_hub_says_so_and_uses_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _Recorder(_CACHE_MISS)
    probes = _patch_hub(monkeypatch, fake, reachable=False)
    with pytest.raises(ModelError) as err:
        resolve("some-org/some-model")
    message = str(err.value)
    assert "the hub could not be reached: huggingface.co:443" in message
    assert "offline because" not in message
    assert fake.local_only == [True] and probes


def test_a_failed_download_names_the_network_or_the_hubs_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx

    try:
        raise httpx.ConnectError("[Errno 101] Network is unreachable")
    except httpx.ConnectError as cause:
        lost = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        lost.__cause__ = cause
    fake = _Recorder(lost)
    _patch_hub(monkeypatch, fake, reachable=True)
    with pytest.raises(ModelError, match=r"the hub could not be reached: \[Errno 101\]"):
        resolve("some-org/some-model")
    assert fake.local_only == [False]  # online: a download was allowed

    absent = OSError("some-org/nope is not a local folder and is not a valid model identifier")
    _patch_hub(monkeypatch, _Recorder(absent), reachable=True)
    with pytest.raises(ModelError, match="the Hugging Face hub did not give it: some-org/nope"):
        resolve("some-org/nope")


def test_hub_ids_download_only_when_online(monkeypatch: pytest.MonkeyPatch, deberta: Path) -> None:
    from cotune.models.zoo import _pretrained_kwargs

    config = json.loads((deberta / "config.json").read_text())
    fake = _Recorder(config=config)
    _patch_hub(monkeypatch, fake, reachable=True)
    online = resolve("some-org/deberta")
    assert (online.family, online.origin) == ("encoder", "HF hub")
    assert _pretrained_kwargs(online) == {}  # from_pretrained may download
    assert fake.local_only == [False]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _patch_hub(monkeypatch, fake, reachable=None)
    cached = resolve("some-org/deberta")
    assert cached.origin == "HF cache (offline because HF_HUB_OFFLINE=1 was given)"
    assert _pretrained_kwargs(cached) == {"local_files_only": True}
    assert fake.local_only == [False, True]


def test_zoo_names_and_folders_never_probe_the_hub(deberta: Path) -> None:
    # (no_network makes hub.reachable fail the test)
    from cotune.models.zoo import _pretrained_kwargs

    for name in ("tiny-bert", str(deberta)):
        assert _pretrained_kwargs(resolve(name)) == {"local_files_only": True}


def test_cli_offline_flag_reaches_the_error_and_the_children(
    monkeypatch: pytest.MonkeyPatch, sst2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cotune.runtime.launcher import child_env

    assert "HF_HUB_OFFLINE" not in child_env()  # not forced: children do what the user said
    for var in (hub.OFFLINE_FLAG, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "")  # restored after the test (main sets them)
    fake = _Recorder(_CACHE_MISS)
    _patch_hub(monkeypatch, fake, reachable=None)
    config = _write_config(tmp_path, "centralized", "some-org/some-model", sst2)
    code = main(["--offline", "run", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "cotune is offline because --offline was given" in err
    env = child_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env[hub.OFFLINE_FLAG] == "1"


# ----------------------------------------------------------------------------- data sets


def test_data_sets_stay_offline_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setattr(hub, "reachable", lambda endpoint="": True)
    packaged = hub.datasets_unavailable(named=False)
    assert packaged is not None and "unless the task names a hub data set" in packaged
    assert hub.datasets_unavailable(named=True) is None  # hf:<id>
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # the opt-in for GLUE / E2E
    assert hub.datasets_unavailable(named=False) is None
    monkeypatch.setattr(hub, "reachable", lambda endpoint="": False)
    assert (hub.datasets_unavailable(named=True) or "").startswith("the hub could not be reached")
    monkeypatch.setenv(hub.OFFLINE_FLAG, "1")
    assert hub.datasets_unavailable(named=True) == "offline because --offline was given"
