"""Every run folder ends with model/, which loads without cotune.

Tiny random models train a few steps with each kind of method; then a fresh Python
process, in which an import hook refuses `cotune` (and `peft`, for a merged model),
loads RUN_DIR/model with transformers (+ peft) calls only, the exported tokenizer
tokenises the evaluation texts, and its logits must be the logits of cotune's own model
rebuilt from the run's saved weights (the split model through its device -> cloud ->
head segments), and their argmax the run's predictions.jsonl. Training must have moved
the logits by far more than the tolerance, so an export that dropped the trained weights
would fail. Also: `cotune export` on an existing run, `--merge`, and its user errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_e2e, write_sst2
from safetensors.torch import load_file

from cotune.cli.main import main
from cotune.config import build_config, to_toml
from cotune.data import load_task
from cotune.data.pairs import PROMPT_SUFFIX, bos_prefix, prompt_ids
from cotune.methods import resolve
from cotune.methods.split import build_split
from cotune.models import load_adapter_state_dict, load_tokenizer
from cotune.report.run_folder import read_jsonl
from cotune.runtime.experiment import load_experiment, run_experiment
from cotune.training import adapter_for, model_inputs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ATOL = 2e-5  # float32 logits of ~1: summation order differs with padding and merging

# Runs in a fresh interpreter: transformers and peft only. `cotune` (and, with
# "no_peft", `peft`) cannot be imported at all: it is None in sys.modules.
LOADER = r"""
import json, sys

request = json.load(open(sys.argv[1]))
blocked = ["cotune"] + (["peft"] if request.get("no_peft") else [])
for name in blocked:
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import torch
import transformers

folder = request["folder"]
record = json.load(open(folder + "/cotune_export.json"))
auto = getattr(transformers, record["auto_class"])
trust = record["trust_remote_code"]
if record["format"] == "peft-adapter":
    from peft import PeftModel

    base = auto.from_pretrained(record["base_model_name_or_path"], trust_remote_code=trust)
    model = PeftModel.from_pretrained(base, folder)
else:
    model = auto.from_pretrained(folder, trust_remote_code=trust)
model.eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
out = {"class": type(model).__name__}
with torch.no_grad():
    if "texts" in request:
        first = [t[0] for t in request["texts"]]
        second = [t[1] for t in request["texts"]]
        enc = tokenizer(first, second if any(second) else None, truncation=True,
                        max_length=request["max_len"], padding=True, return_tensors="pt")
        out["input_ids"] = enc["input_ids"].tolist()
        out["logits"] = model(**enc).logits.tolist()
    else:
        gen = request["generate"]
        out["logits"], out["outputs"] = [], []
        for ids in request["prompt_ids"]:
            x = torch.tensor([ids])
            out["logits"].append(model(input_ids=x).logits[0].tolist())
            seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **gen)
            out["outputs"].append(tokenizer.decode(seq[0, len(ids):], skip_special_tokens=True).strip())
loaded = {m.split(".")[0] for m, module in sys.modules.items() if module is not None}
out["imported"] = sorted(loaded & {"cotune", "peft"})
json.dump(out, open(request["out"], "w"))
"""


def load_without_cotune(tmp: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Run LOADER on `request` in a fresh interpreter; its answer."""
    tmp.mkdir(parents=True, exist_ok=True)
    req, out = tmp / "request.json", tmp / "answer.json"
    req.write_text(json.dumps({**request, "out": str(out)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp / "hf-modules"), "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", LOADER, str(req)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(out.read_text())
    return answer


# ----------------------------------------------------------------------------- cotune's side


def _eval_examples(run: Path) -> tuple[Any, Any]:
    cfg = load_experiment(run / "config.toml")
    return cfg, load_task(cfg.task, cfg.seed)


def cotune_logits(run: Path, *, trained: bool = True) -> torch.Tensor:
    """The eval logits of cotune's own model with the run's saved weights (or, with
    `trained=False`, as built before training), over the run's eval batches."""
    cfg, task = _eval_examples(run)
    adapter = adapter_for(task, cfg)
    if cfg.method == "split":
        split, _ = build_split(cfg, task.num_labels, task.kind)
        modules = split.device_modules() + split.cloud_modules()
        named = split.named_trainable(modules)
        if trained:
            state = {**load_file(str(run / "device_trainable.safetensors")),
                     **load_file(str(run / "cloud_trainable.safetensors"))}  # fmt: skip
            assert set(state) == set(named)
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(state[name])
        for m in modules:
            m.eval()
        tokenizer = load_tokenizer(cfg.model.name)

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return split.head(split.cloud(*split.device(**model_inputs(batch)))).logits
    else:
        model, tokenizer = adapter.build_model()
        if trained:
            load_adapter_state_dict(model, load_file(str(run / "trainable.safetensors")))
        model.eval()

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(**model_inputs(batch)).logits

    with torch.no_grad():
        rows = [forward(b) for loader in adapter.eval_loaders(tokenizer).values() for b in loader]
    return torch.cat(rows)


def check_classifier_export(run: Path, tmp: Path, *, folder: Path | None = None,
                            no_peft: bool = False) -> dict[str, Any]:  # fmt: skip
    """Load `folder` (default run/model) without cotune; its logits must be cotune's."""
    cfg, task = _eval_examples(run)
    texts = [[ex.text_a, ex.text_b] for examples in task.eval.values() for ex in examples]
    answer = load_without_cotune(tmp, {
        "folder": str(folder or run / "model"), "texts": texts,
        "max_len": cfg.train.max_seq_len, "no_peft": no_peft,
    })  # fmt: skip
    assert "cotune" not in answer["imported"]
    # the exported tokenizer is cotune's
    tokenizer = load_tokenizer(cfg.model.name)
    ids = [tokenizer(a, b, truncation=True, max_length=cfg.train.max_seq_len)["input_ids"]
           for a, b in texts]  # fmt: skip
    assert [[i for i in row if i != tokenizer.pad_token_id] for row in answer["input_ids"]] == [
        [i for i in row if i != tokenizer.pad_token_id] for row in ids
    ]
    got, want = torch.tensor(answer["logits"]), cotune_logits(run)
    before = cotune_logits(run, trained=False)
    assert (want - before).abs().max() > 100 * ATOL  # training moved them: a real check
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    predictions = [r["prediction"] for r in read_jsonl(run / "predictions.jsonl")]
    assert got.argmax(-1).tolist() == predictions
    return answer


def _run(tmp: Path, **sections: Any) -> Path:
    data = write_sst2(tmp, n_train=64, n_dev=24)
    raw: dict[str, Any] = {
        "name": "export", "method": "centralized", "seed": 0,
        "task": {"name": "glue/sst2", "data_dir": str(data)},
        "model": {"name": "tiny-bert", "lora": {"r": 4, "alpha": 8}},
        "train": {"steps": 4, "batch_size": 8, "max_seq_len": 24, "threads": 1, "lr": 0.05},
    }  # fmt: skip
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return run_experiment(resolve(build_config(raw)), tmp / "run")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A centralized LoRA run on tiny-bert (mean pooling, as minilm)."""
    return _run(tmp_path_factory.mktemp("lora"))


# ----------------------------------------------------------------------------- the runs


def test_a_lora_run_exports_a_peft_adapter_and_its_base(lora_run: Path, tmp_path: Path) -> None:
    model = lora_run / "model"
    adapter = json.loads((model / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((model / "base").resolve())
    assert adapter["task_type"] == "SEQ_CLS" and "head" in adapter["modules_to_save"]
    config = json.loads((model / "base" / "config.json").read_text())
    assert config["pooling"] == "mean"
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert (model / "base" / "modeling_cotune_classifier.py").is_file()
    answer = check_classifier_export(lora_run, tmp_path)
    assert answer["class"] == "PeftModelForSequenceClassification"


def test_cotune_export_rewrites_it_from_the_saved_weights(lora_run: Path, tmp_path: Path) -> None:
    first = load_file(str(lora_run / "model" / "adapter_model.safetensors"))
    out = tmp_path / "again"
    assert main(["export", str(lora_run), "--out", str(out)]) == 0
    again = load_file(str(out / "adapter_model.safetensors"))
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())


def test_merge_writes_one_model_that_needs_no_peft(lora_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--merge", "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and not (out / "base").exists()
    answer = check_classifier_export(lora_run, tmp_path / "load", folder=out, no_peft=True)
    assert answer["class"] == "CotuneForSequenceClassification"
    assert answer["imported"] == []


def test_full_finetuning_exports_the_model(tmp_path: Path) -> None:
    # a decoder classifier (last-token pooling), every weight trained
    run = _run(tmp_path, model={"name": "tiny-llama", "lora": None},
               train={"lr": 1e-3, "optimizer": "sgd"})  # fmt: skip
    model = run / "model"
    assert not (model / "adapter_config.json").exists()
    assert json.loads((model / "config.json").read_text())["pooling"] == "last"
    answer = check_classifier_export(run, tmp_path / "load")
    assert answer["class"] == "CotuneForSequenceClassification"


def test_split_with_the_sft_codec_exports_the_joined_model(tmp_path: Path) -> None:
    run = _run(tmp_path, method="split", split={"cut": 2},
               link={"codec": "sft", "rank": 8})  # fmt: skip
    record = json.loads((run / "model" / "cotune_export.json").read_text())
    assert record["from_files"] == ["device_trainable.safetensors", "cloud_trainable.safetensors"]
    assert any("folded" in n for n in record["notes"])
    base = json.loads((run / "model" / "base" / "config.json").read_text())
    assert base["no_ffn_residual_layers"] == [2]
    check_classifier_export(run, tmp_path / "load")


def test_split_sft_with_lora_on_every_linear_layer_exports_the_joined_model(
    tmp_path: Path,
) -> None:
    # the cut layer's FFN input matrix is a LoRA target too: the factors replace it and
    # its adapter, and the export folds them into a trained copy of that matrix
    run = _run(tmp_path, method="split", split={"cut": 2}, link={"codec": "sft", "rank": 8},
               model={"lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"]}})  # fmt: skip
    record = json.loads((run / "model" / "cotune_export.json").read_text())
    assert any("folded" in n for n in record["notes"])
    check_classifier_export(run, tmp_path / "load")


def test_fedlora_exports_the_final_global_model_without_checkpoints(tmp_path: Path) -> None:
    run = _run(tmp_path, method="fedlora",
               federated={"clients": 2, "rounds": 2, "local_steps": 2},
               runtime={"engine": "inline", "checkpoint": False})  # fmt: skip
    assert not (run / "checkpoint").exists()
    assert (run / "trainable.safetensors").is_file()
    check_classifier_export(run, tmp_path / "load")


def test_a_causal_lm_exports_an_adapter_that_generates_the_runs_outputs(tmp_path: Path) -> None:
    data = write_e2e(tmp_path / "e2e", n_train=6)
    gen = {"num_beams": 2, "max_new_tokens": 6, "metrics": ["bleu"]}
    cfg = resolve(build_config({
        "name": "export-lm", "method": "centralized", "seed": 0,
        "task": {"name": "e2e", "data_dir": data},
        "model": {"name": "tiny-llama", "lora": {"r": 4, "alpha": 8}},
        "train": {"steps": 3, "batch_size": 2, "max_seq_len": 32, "threads": 1, "lr": 0.05},
        "generation": gen,
    }))  # fmt: skip
    run = run_experiment(cfg, tmp_path / "run")
    record = json.loads((run / "model" / "cotune_export.json").read_text())
    assert record["auto_class"] == "AutoModelForCausalLM" and not record["trust_remote_code"]
    assert record["prompt_format"]["suffix"] == PROMPT_SUFFIX
    # cotune's model and its eval prompts, as the run's beam search saw them
    model, tokenizer = adapter_for(load_task(cfg.task, cfg.seed), cfg).build_model()
    load_adapter_state_dict(model, load_file(str(run / "trainable.safetensors")))
    model.eval()
    records = read_jsonl(run / "predictions.jsonl")
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    assert bos_prefix(tokenizer) == []
    generate = {"num_beams": 2, "length_penalty": cfg.generation.length_penalty,
                "no_repeat_ngram_size": cfg.generation.no_repeat_ngram_size,
                "max_new_tokens": 6, "early_stopping": True, "do_sample": False,
                "eos_token_id": record["prompt_format"]["eos_token_id"],
                "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    answer = load_without_cotune(tmp_path / "load", {
        "folder": str(run / "model"), "prompt_ids": ids, "generate": generate,
    })  # fmt: skip
    assert answer["class"] == "PeftModelForCausalLM" and "cotune" not in answer["imported"]
    with torch.no_grad():
        for row, x in zip(answer["logits"], ids, strict=True):
            want = model(input_ids=torch.tensor([x])).logits[0]
            torch.testing.assert_close(torch.tensor(row), want, atol=ATOL, rtol=1e-4)
    assert answer["outputs"] == [r["output"] for r in records]


@pytest.mark.integration
def test_minilm_exports_with_its_mean_pooling(tmp_path: Path) -> None:
    # the packaged sentence encoder: a BERT whose checkpoint was trained mean-pooled
    run = _run(tmp_path, model={"name": "minilm"}, train={"steps": 2, "lr": 0.01})
    config = json.loads((run / "model" / "base" / "config.json").read_text())
    assert config["pooling"] == "mean" and config["base_model_config"]["hidden_size"] == 384
    check_classifier_export(run, tmp_path / "load")


def test_runtime_export_false_writes_no_model(tmp_path: Path) -> None:
    run = _run(tmp_path, runtime={"export": False}, train={"steps": 1})
    assert not (run / "model").exists() and (run / "trainable.safetensors").is_file()


# ----------------------------------------------------------------------------- errors


def test_export_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def export(folder: Path) -> str:
        assert main(["export", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cotune: error: ") and "Traceback" not in err
        return err

    assert "does not exist" in export(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "not a cotune run folder" in export(tmp_path / "empty")
    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = resolve(build_config({
        "name": "bare", "model": {"name": "tiny-bert"},
        "task": {"name": "glue/sst2", "data_dir": str(write_sst2(tmp_path))},
    }))  # fmt: skip
    (bare / "config.toml").write_text(to_toml(cfg))
    assert "holds no saved weights" in export(bare)


def test_export_does_not_replace_a_folder_it_did_not_write(
    lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(lora_run), "--out", str(mine)]) == 2
    assert "is not a cotune export" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
