"""`cotune config --defaults`: the whole schema as TOML with help, parsed back as the
default config."""

from __future__ import annotations

import tomllib

from pydantic import BaseModel

from cotune.cli.main import main
from cotune.config import Config, build_config


def _defaults(capsys) -> str:  # type: ignore[no-untyped-def]
    assert main(["config", "--defaults"]) == 0
    return capsys.readouterr().out


def test_defaults_parse_back_as_the_default_config(capsys) -> None:
    text = _defaults(capsys)
    data = tomllib.loads(text)
    assert build_config(data) == Config()
    assert data["method"] == "centralized" and data["task"]["name"] == "bbc-news"
    assert data["train"]["batch_size"] == 16 and data["train"]["max_seq_len"] == 128
    assert data["link"]["codec"] == "identity" and data["link"]["rank"] == 8
    assert data["federated"]["rounds"] == 10 and data["federated"]["devices"] == []
    assert data["memory"]["ops"] == ["linear", "matmul", "softmax", "layernorm", "activation"]
    # unset keys and optional tables are there, commented out
    assert "lr" not in data["train"] and "# lr = (unset)" in text
    assert "lora" not in data["model"] and "# [model.lora]\n" in text and "# r = 8" in text
    assert "# [[federated.devices]]" in text


def _fields(model: type[BaseModel], prefix: str = ""):  # type: ignore[no-untyped-def]
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        inner = [a for a in getattr(field.annotation, "__args__", ()) if isinstance(a, type)]
        for sub in [field.annotation, *inner]:
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _fields(sub, f"{prefix}{name}.")


def test_every_key_has_help_and_is_shown_with_it(capsys) -> None:
    text = _defaults(capsys)
    lines = text.splitlines()
    for path, field in _fields(Config):
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):  # a [section]
            assert section.__doc__, f"{path}: its class has no docstring (the section's help)"
            at = lines.index(f"[{path}]")
            assert lines[at - 1].startswith("# "), path
            continue
        assert field.description, f"{path} has no help text (a docstring under the field)"
        key = path.rsplit(".", 1)[-1]
        shown = [i for i, line in enumerate(lines) if line.lstrip("# ").startswith(f"{key} =")]
        if not shown:  # an optional table, unset: its keys are shown commented out
            assert f"# [{path}]" in lines, f"{path} is not in the output"
            continue
        # the line before a key is the end of a comment (its help)
        assert all(lines[i - 1].startswith("#") for i in shown), path
    # choices and bounds come from the schema
    assert "[valid: one of: fp32, bf16]" in text
    assert "Training examples per step. [valid: >= 1]" in text


def test_config_without_defaults_or_file_exits_2(capsys) -> None:
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "--defaults" in err and "Traceback" not in err
    assert main(["config", "--defaults", "--set", "train.steps=3"]) == 2


def test_config_prints_a_file_resolved(tmp_path, capsys) -> None:
    path = tmp_path / "c.toml"
    path.write_text('method = "centralized"\n[model]\nlora = { r = 4 }\n')
    assert main(["config", str(path), "--set", "train.steps=7"]) == 0
    data = tomllib.loads(capsys.readouterr().out)
    assert data["model"]["lora"]["r"] == 4 and data["train"]["steps"] == 7
    assert data["train"]["lr"] == 2e-3  # the LoRA default, resolved
