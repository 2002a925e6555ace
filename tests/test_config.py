"""Config schema, TOML loading, --set overrides and their error messages."""

from __future__ import annotations

import tomllib
import warnings

import pytest

from cotune.config import Config, build_config, load_config, parse_value, to_toml
from cotune.errors import ConfigError
from cotune.methods import resolve


def test_defaults_validate_and_resolve_lr_per_regime() -> None:
    cfg = Config()
    assert cfg.method == "centralized"
    assert cfg.resolved_lr() == 5e-5
    lora = build_config({"model": {"lora": {"r": 4}}})
    assert lora.model.lora is not None and lora.model.lora.r == 4
    assert lora.resolved_lr() == 2e-3


def test_load_toml_and_overrides_convert_types(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('method = "centralized"\n[train]\nsteps = 10\n[model]\nname = "tiny-bert"\n')
    cfg = load_config(
        path,
        [
            "train.lr=1e-3",
            "train.steps=20",
            "train.precision=bf16",
            "model.lora.r=16",
            "memory.ops=['linear']",
            "federated.fraction=0.5",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.steps == 20
    assert cfg.train.precision == "bf16"
    assert cfg.model.lora is not None and cfg.model.lora.r == 16
    assert cfg.memory.ops == ["linear"]
    assert cfg.federated.fraction == 0.5


def test_parse_value() -> None:
    assert parse_value("3") == 3
    assert parse_value("2e-3") == pytest.approx(2e-3)
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("glue/sst2") == "glue/sst2"
    assert parse_value("{ r = 4 }") == {"r": 4}


def test_unknown_key_names_key_and_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"step": 10}})
    msg = str(err.value)
    assert "train.step" in msg and "steps" in msg and "batch_size" in msg


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        build_config({"trian": {}})


def test_wrong_type_in_set_names_key() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({}, ["train.steps=abc"])
    assert "train.steps" in str(err.value) and "abc" in str(err.value)


def test_bad_literal_lists_valid_values() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"task": {"name": "x"}, "train": {"precision": "fp8"}})
    msg = str(err.value)
    assert "train.precision" in msg and "fp32" in msg and "bf16" in msg


def test_unknown_method_lists_valid_methods() -> None:
    """The method registry, not the schema, knows the methods (one line per method)."""
    with pytest.raises(ConfigError) as err:
        resolve(build_config({"method": "fedsomething"}))
    msg = str(err.value)
    assert "method" in msg and "centralized" in msg and "fedpft" in msg


def test_range_checks() -> None:
    with pytest.raises(ConfigError, match="federated.fraction"):
        build_config({"federated": {"fraction": 1.5}})
    with pytest.raises(ConfigError, match="steps or train.epochs"):
        build_config({"train": {"steps": 5, "epochs": 1}})
    with pytest.raises(ConfigError, match="ffn_keep"):
        build_config({"proxy": {"ffn_keep": 12.5}})


def test_malformed_set_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        build_config({}, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_unused_section_warns_not_errors() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = resolve(build_config({"method": "centralized", "split": {"cut": 2}}))
    assert cfg.split.cut == 2
    assert any("[split] is not read" in str(w.message) for w in caught)


def test_resolved_toml_round_trips() -> None:
    cfg = build_config({"name": "x", "model": {"lora": {"r": 4}}, "train": {"steps": 7}})
    text = to_toml(cfg)
    data = tomllib.loads(text)
    assert data["train"]["lr"] == 2e-3  # the resolved default is written, not omitted
    again = build_config(data)
    assert again == cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 2e-3})})
