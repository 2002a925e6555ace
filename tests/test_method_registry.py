"""Adding a method is one new module plus one registry line: a toy method written by
the test, registered with one line, runs through `cotune run` like a built-in one."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from cotune.cli.main import main
from cotune.errors import ConfigError
from cotune.methods import FederatedSpec, LocalSpec, MethodSpec, get_spec, method_names, registry
from cotune.methods.spec import ServerHook

TOY_MODULE = '''
"""A toy method: predict the most common training label (no model, no training)."""

from collections import Counter

from cotune.data import load_task
from cotune.errors import ConfigError
from cotune.methods import LocalSpec, MethodResult, MethodSpec


def train(cfg, recorder, run_dir):
    task = load_task(cfg.task, cfg.seed)
    majority = Counter(ex.label for ex in task.train).most_common(1)[0][0]
    evals = [ex for examples in task.eval.values() for ex in examples]
    accuracy = sum(ex.label == majority for ex in evals) / len(evals)
    recorder.log_eval({"step": 0, "accuracy": accuracy, "bytes_up": 0, "bytes_down": 0, "wall_s": 0.0})
    return MethodResult(metrics={"accuracy": accuracy}, extra={"majority": majority})


def configure(cfg):
    if cfg.model.lora is not None:
        raise ConfigError("method 'toy' trains no model: remove model.lora")


SPEC = MethodSpec(
    name="toy",
    summary="predicts the majority class",
    runs=LocalSpec(train=train),
    configure=configure,
)
'''

# 3 positive and 1 negative training rows; the dev set has 2 positive of 5
TRAIN = ["sentence\tlabel", "good .\t1", "fine .\t1", "great .\t1", "bad .\t0"]
DEV = ["sentence\tlabel", "nice .\t1", "awful .\t0", "poor .\t0", "lovely .\t1", "dull .\t0"]


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The toy module on sys.path and its one registry line."""
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.METHODS, "toy", "toy_method")  # the one registry line
    yield tmp_path
    sys.modules.pop("toy_method", None)


def _config(folder: Path, method: str = "toy", extra: str = "") -> Path:
    data = folder / "SST-2"
    data.mkdir(exist_ok=True)
    (data / "train.tsv").write_text("\n".join(TRAIN) + "\n")
    (data / "dev.tsv").write_text("\n".join(DEV) + "\n")
    path = folder / f"{method}.toml"
    path.write_text(
        f'method = "{method}"\nname = "toy-run"\n[task]\nname = "glue/sst2"\n'
        f'data_dir = "{data}"\n{extra}'
    )
    return path


def test_toy_method_runs_through_cotune_run(toy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = toy / "run"
    assert main(["run", str(_config(toy)), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "toy" and summary["method_kind"] == "local"
    assert summary["metrics"] == {"accuracy": 2 / 5}  # majority label 1 on the dev set
    assert summary["majority"] == 1
    assert (out / "config.toml").read_text().startswith('name = "toy-run"')
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["accuracy"] == 0.4
    assert "toy on glue/sst2: accuracy=0.4000" in capsys.readouterr().out
    # everything else reads the same registry: the method list ...
    assert "toy" in method_names()
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "│ toy " in listing and "predicts" in listing


def test_toy_method_rules_and_unread_sections(
    toy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ... its own rules (exit 2, one paragraph) ...
    bad = _config(toy, extra="[model]\nlora = { r = 4 }\n")
    assert main(["run", str(bad), "--out", str(toy / "bad")]) == 2
    assert "method 'toy' trains no model" in capsys.readouterr().err
    # ... the warning for a section the method does not read ...
    unread = _config(toy, extra="[federated]\nclients = 3\n")
    assert main(["run", str(unread), "--out", str(toy / "warned")]) == 0
    assert "[federated] is not read by method 'toy'" in capsys.readouterr().err
    # ... and resume, which it does not support
    assert main(["run", "--resume", str(toy / "warned")]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_unknown_method_names_the_valid_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, method="fedsomething")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "fedsomething" in err and "centralized" in err and "splitfed" in err
    assert "Traceback" not in err


def test_every_registered_method_declares_a_spec() -> None:
    kinds = {name: type(get_spec(name).runs) for name in registry.METHODS}
    assert kinds == {
        "centralized": LocalSpec,
        "split": registry.get_spec("split").runs.__class__,
        "splitfed": registry.get_spec("splitfed").runs.__class__,
        "fedavg": FederatedSpec,
        "fedlora": FederatedSpec,
        "fedkd": FederatedSpec,
        "fedpft": FederatedSpec,
    }
    for name in registry.METHODS:
        spec = get_spec(name)
        assert isinstance(spec, MethodSpec) and spec.name == name and spec.summary


def test_server_hook_defaults_do_nothing() -> None:
    """Optional hooks are declared on the base class with defaults (no getattr lookups)."""
    hook = ServerHook()
    state = {"w": __import__("numpy").ones(2)}
    assert hook.after_aggregate(1, state) is state
    assert hook.extras_for(0, 1) == {} and hook.round_metrics() == {}
    assert hook.state_dict() == {} and hook.trainable == 0
    hook.observe_reply(1, 0, {}, 1.0, True)
    hook.load_state_dict({})


def test_register_a_spec_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`register(spec)` adds a spec defined outside the package (plugins)."""
    calls = []

    def train(cfg, recorder, run_dir):  # type: ignore[no-untyped-def]
        calls.append(cfg.method)
        from cotune.methods import MethodResult

        recorder.log_eval({"step": 0, "accuracy": 1.0, "bytes_up": 0, "bytes_down": 0, "wall_s": 0})
        return MethodResult(metrics={"accuracy": 1.0})

    registry.register(MethodSpec(name="plugin", summary="a plugin", runs=LocalSpec(train=train)))
    try:
        assert (
            main(["run", str(_config(tmp_path, method="plugin")), "--out", str(tmp_path / "r")])
            == 0
        )
    finally:
        registry.unregister("plugin")
    assert calls == ["plugin"]
    with pytest.raises(ConfigError):
        get_spec("plugin")
