"""fedkd and fedpft beyond text classification: image classification (tiny-dinov2 on a
tiny Fashion-MNIST, the proxy aligned on public handwritten digits) and extractive QA
(tiny-bert on a tiny SQuAD), on the inline engine; the per-token distillation loss;
the config errors of both methods."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, write_squad, write_sst2
from image_helpers import write_fashion_mnist

from cotune.config import Config, build_config, to_toml
from cotune.config.schema import ProxyConfig, TaskConfig
from cotune.data import load_task
from cotune.errors import ConfigError, ModelError
from cotune.methods import resolve
from cotune.methods.federated.global_model import GlobalModel
from cotune.methods.fedkd import KDHook, distillation_losses, mutual_distillation_losses
from cotune.methods.fedpft.alignment import align, layer_gaps
from cotune.methods.fedpft.device import DeviceStore, device_store_root
from cotune.models import build_classifier
from cotune.models.proxy import ATTENTION_PROJECTIONS, build_proxy
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.server import config_from_text
from cotune.training import adapter_for, model_inputs
from cotune.training.tasks import Distribution

# ----------------------------------------------------------------------------- configs


def image_cfg(data: Path, method: str, **sections: dict) -> Config:
    raw: dict = {
        "method": method,
        "seed": 0,
        "task": {"name": "fashion-mnist", "data_dir": str(data), "image_size": 28,
                 "max_eval_examples": 10},
        "model": {"name": "tiny-dinov2", "lora": {"r": 4, "alpha": 8}},
        "train": {"batch_size": 8, "eval_batch_size": 16, "threads": 1},
        "federated": {"clients": 2, "rounds": 2, "local_steps": 2},
        "runtime": {"engine": "inline"},
    }  # fmt: skip
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return resolve(build_config(raw))


def qa_cfg(data: Path, method: str, **sections: dict) -> Config:
    raw: dict = {
        "method": method,
        "seed": 0,
        "task": {"name": "squad", "data_dir": str(data), "split_eval": 0.25,
                 "max_eval_examples": 6},
        "model": {"name": "tiny-bert", "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "train": {"batch_size": 4, "max_seq_len": 32, "threads": 1},
        "federated": {"clients": 2, "rounds": 2, "local_steps": 2},
        "runtime": {"engine": "inline"},
    }  # fmt: skip
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return resolve(build_config(raw))


def run(cfg: Config, out: Path) -> tuple[list[dict], dict]:
    from cotune.runtime.experiment import run_experiment

    folder = run_experiment(cfg, out)
    summary = json.loads((folder / "summary.json").read_text())
    return read_jsonl(folder / "metrics.jsonl"), summary["metrics"]


# ----------------------------------------------------------------------------- fedkd


def test_per_token_distillation_ignores_padding_and_averages_start_and_end() -> None:
    torch.manual_seed(0)
    s_start, s_end, t_start, t_end = (torch.randn(3, 6) for _ in range(4))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False  # row 0 has two padding tokens
    ce_s, ce_t = torch.tensor(1.5), torch.tensor(0.5)
    temp = 2.0

    def losses(*logits: torch.Tensor):  # type: ignore[no-untyped-def]
        a, b, c, d = (Distribution(x, mask) for x in logits)
        return distillation_losses(ce_s, ce_t, [a, b], [c, d], temp)

    out = losses(s_start, s_end, t_start, t_end)

    def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
        """KL(p || q) per row over the real tokens only, averaged over rows, times T^2."""
        rows = []
        for i in range(3):
            m = mask[i]
            p = torch.softmax(p_logits[i][m] / temp, -1)
            q = torch.softmax(q_logits[i][m] / temp, -1)
            rows.append((p * (p.log() - q.log())).sum())
        return torch.stack(rows).mean() * temp**2

    expected = (kl(t_start, s_start) + kl(t_end, s_end)) / 2
    torch.testing.assert_close(out.kl_student, expected)
    torch.testing.assert_close(out.student, ce_s + expected / (ce_s + ce_t + 1))
    # what the padding holds does not matter
    noisy = [x.clone() for x in (s_start, s_end, t_start, t_end)]
    for x in noisy:
        x[0, 4:] = 50.0
    again = losses(*noisy)
    torch.testing.assert_close(again.kl_student, out.kl_student)
    torch.testing.assert_close(again.kl_teacher, out.kl_teacher)
    # one distribution per example (classification) is the special case without a mask
    y = torch.tensor([0, 2, 1])
    cls = mutual_distillation_losses(s_start, t_start, y, temp)
    assert float(cls.kl_student) > 0
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_losses(ce_s, ce_t, [Distribution(s_start)], [Distribution(t_end[:, :5])], 2.0)


@pytest.mark.slow
def test_fedkd_on_images_distils_a_tiny_dinov2(tmp_path: Path) -> None:
    data = write_fashion_mnist(tmp_path / "fm", n_train=48)
    cfg = image_cfg(data, "fedkd", kd={"teacher": "tiny-dinov2", "server_steps": 2,
                                       "public_fraction": 0.25})  # fmt: skip
    rounds, metrics = run(cfg, tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["teacher_accuracy"] <= 1.0
        assert r["kd_kl_student"] > 0 and 0 < r["kd_scale"] < 1
    assert metrics["accuracy"] == rounds[-1]["accuracy"]


@pytest.mark.slow
def test_fedkd_on_text_classification_still_distils(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=64)
    cfg = tiny_config(data, method="fedkd", runtime={"engine": "inline"},
                      kd={"teacher": "tiny-roberta", "server_steps": 2})  # fmt: skip
    rounds, _ = run(cfg, tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2]
    # the values of the code before the task adapters gave the distributions
    assert rounds[0]["kd_kl_student"] == pytest.approx(0.0045949609, rel=1e-3)
    assert rounds[1]["kd_ce_teacher"] == pytest.approx(0.6432693601, rel=1e-3)
    assert all(r["accuracy"] == r["teacher_accuracy"] == 0.625 for r in rounds)


@pytest.mark.slow
def test_fedkd_on_qa_distils_start_and_end_logits(tmp_path: Path) -> None:
    data = write_squad(tmp_path / "squad", n_articles=8)
    cfg = qa_cfg(data, "fedkd", kd={"teacher": "tiny-roberta", "server_steps": 2,
                                    "public_fraction": 0.25})  # fmt: skip
    rounds, metrics = run(cfg, tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert {"exact_match", "f1", "teacher_exact_match", "teacher_f1"} <= set(r)
        assert r["kd_kl_student"] > 0 and r["kd_kl_teacher"] > 0
    assert metrics["f1"] == rounds[-1]["f1"]


def test_fedkd_defaults_and_teacher_errors(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    images = write_fashion_mnist(tmp_path / "fm", n_train=24)
    assert image_cfg(images, "fedkd").kd.teacher == "dinov2-small"
    sst2 = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    text = resolve(build_config({"method": "fedkd", "task": {"name": "sst2",
                                                             "data_dir": str(sst2)}}))  # fmt: skip
    assert text.kd.teacher == "minilm"
    # a text teacher for images: refused when the server starts, naming kd.teacher
    cfg = image_cfg(images, "fedkd", kd={"teacher": "tiny-bert"})
    with pytest.raises(ConfigError, match="kd.teacher = 'tiny-bert'.*image model"):
        KDHook(cfg, GlobalModel(cfg))
    # an image teacher for text likewise
    cfg = resolve(build_config({"method": "fedkd", "model": {"name": "tiny-bert"},
                                "task": {"name": "sst2", "data_dir": str(sst2)},
                                "kd": {"teacher": "tiny-dinov2"}}))  # fmt: skip
    with pytest.raises(ConfigError, match="kd.teacher = 'tiny-dinov2'.*image model"):
        KDHook(cfg, GlobalModel(cfg))
    # QA distils per token: a teacher that tokenises otherwise (here: its vocabulary has
    # one more token, "what colour") is refused
    from transformers import AutoTokenizer

    from cotune.models import packaged, span

    squad = write_squad(tmp_path / "squad", n_articles=8)
    cfg = qa_cfg(squad, "fedkd", kd={"teacher": "tiny-roberta"})
    real = span.load_tokenizer
    other = AutoTokenizer.from_pretrained(str(packaged.require_minilm_dir()),
                                          local_files_only=True)  # fmt: skip
    assert other.add_tokens(["what colour"]) == 1
    monkeypatch.setattr(
        span, "load_tokenizer", lambda name: other if name == "tiny-roberta" else real(name)
    )
    with pytest.raises(ConfigError, match="must tokenise exactly as the student"):
        KDHook(cfg, GlobalModel(cfg))


def test_fedkd_and_fedpft_refuse_regression_and_generation() -> None:
    for method, task in itertools.product(("fedkd", "fedpft"), ("glue/stsb", "e2e")):
        with pytest.raises(ConfigError, match=f"{method} does not support task kind"):
            resolve(build_config({"method": method, "task": {"name": task}}))


def test_a_text_task_refuses_an_image_model(tmp_path: Path) -> None:
    sst2 = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    cfg = resolve(build_config({"method": "centralized", "model": {"name": "tiny-dinov2"},
                                "task": {"name": "sst2", "data_dir": str(sst2)}}))  # fmt: skip
    with pytest.raises(ModelError, match="'tiny-dinov2' is an image model"):
        adapter_for(load_task(cfg.task, 0), cfg).build_model()


# ----------------------------------------------------------------------------- fedpft


def _public_image_batches(fm_cfg: Config) -> tuple[list[dict], list[dict]]:
    """(alignment batches, held-out batches) of the digits, as fedpft's cloud makes them."""
    task = load_task(TaskConfig(name="digits"), 0)
    adapter = adapter_for(task, fm_cfg)
    train = adapter.loader(adapter.encode(task.train[:96], None), None, shuffle=True, seed=0)
    held = adapter.loader(adapter.encode(task.eval["eval"][:32], None), None, shuffle=False,
                          seed=0)  # fmt: skip
    return [model_inputs(b) for b in train], [model_inputs(b) for b in held]


@pytest.mark.parametrize("kind", ["neuron", "layer_drop"])
def test_alignment_on_public_images_brings_each_proxy_layer_closer(tmp_path: Path,
                                                                   kind: str) -> None:  # fmt: skip
    cfg = image_cfg(write_fashion_mnist(tmp_path / "fm", n_train=8), "fedpft")
    assert cfg.model.lora is not None
    assert cfg.model.lora.target_modules == list(ATTENTION_PROJECTIONS["dinov2"])
    fm, _, _ = build_classifier(cfg.model, 10, seed=0)
    proxy, plan, _ = build_proxy(fm, ProxyConfig(kind=kind, ffn_keep=32))
    assert sum(p.numel() for p in proxy.parameters()) < sum(p.numel() for p in fm.parameters())
    train, held_out = _public_image_batches(cfg)
    before = layer_gaps(proxy, fm, plan, held_out)
    stats = align(proxy, fm, plan, itertools.cycle(train), steps=30, lr=3e-3)
    after = layer_gaps(proxy, fm, plan, held_out)
    assert stats.last_loss < stats.first_loss
    assert before[0] == after[0] == 0.0  # the kept first layer: same input, same weights
    for j in range(1, len(before)):  # every later layer is closer to the FM's
        assert 0 < after[j] < before[j], (j, before, after)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["neuron", "layer_drop"])
def test_fedpft_on_images_scores_the_full_model(tmp_path: Path, kind: str) -> None:
    data = write_fashion_mnist(tmp_path / "fm", n_train=48)
    cfg = image_cfg(data, "fedpft", federated={"rounds": 3},
                    proxy={"kind": kind, "ffn_keep": 32, "align_steps": 4, "realign_steps": 2,
                           "align_every": 1})  # fmt: skip
    assert cfg.proxy.public_corpus == "digits"
    rounds, metrics = run(cfg, tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["clients_ok"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    first = rounds[0]
    assert first["proxy_non_embedding_params"] < first["fm_non_embedding_params"]
    assert first["proxy_gap_after"] < first["proxy_gap_before"]
    if kind == "neuron":  # neuron-level re-alignment after rounds 1 and 2, from device stats
        assert [r.get("proxy_version") for r in rounds] == [2.0, 3.0, None]
        assert rounds[0]["realign_neurons"] == 2 * 16  # half of 32 neurons in layers 1, 2
        assert all(r["realign_gap_after"] < r["realign_gap_before"] for r in rounds[:2])
    else:
        assert all("proxy_version" not in r for r in rounds)
    assert metrics["accuracy"] == rounds[-1]["accuracy"]  # the FM's score
    # device 0 holds the proxy: the compressed FFNs' 32 neurons, or fewer layers
    device_cfg = config_from_text(to_toml(cfg))  # the config a client reads
    _, weights = DeviceStore(device_store_root(device_cfg), 0).load()
    held = {n: w for n, w in weights.items() if n.endswith("mlp.fc1.weight")}
    if kind == "neuron":
        rows = {int(n.split(".layer.")[1].split(".")[0]): w.shape[0] for n, w in held.items()}
        assert rows == {0: 128, 1: 32, 2: 32, 3: 128}
    else:
        assert len(held) == 3 and all(w.shape[0] == 128 for w in held.values())


@pytest.mark.slow
def test_fedpft_on_qa_aligns_on_public_text_and_scores_the_full_model(tmp_path: Path) -> None:
    data = write_squad(tmp_path / "squad", n_articles=8)
    cfg = qa_cfg(data, "fedpft", proxy={"ffn_keep": 32, "align_steps": 3, "realign_steps": 2,
                                        "align_every": 1})  # fmt: skip
    assert cfg.proxy.public_corpus == "bbc-news"
    rounds, metrics = run(cfg, tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all({"exact_match", "f1"} <= set(r) for r in rounds)
    assert rounds[0]["proxy_gap_after"] < rounds[0]["proxy_gap_before"]
    assert rounds[0]["proxy_version"] == 2.0
    assert metrics["f1"] == rounds[-1]["f1"]


def test_fedpft_public_data_errors(tmp_path: Path) -> None:
    data = write_fashion_mnist(tmp_path / "fm", n_train=8)
    with pytest.raises(ConfigError, match=r"'bbc-news' holds text data.*\(e.g. 'digits'\)"):
        image_cfg(data, "fedpft", proxy={"public_corpus": "bbc-news"})
    with pytest.raises(ConfigError, match="is the task the clients train on"):
        image_cfg(data, "fedpft", proxy={"public_corpus": "Fashion_MNIST"})
    with pytest.raises(ConfigError, match="proxy.public_corpus = 'cifar'"):
        image_cfg(data, "fedpft", proxy={"public_corpus": "cifar"})
    sst2 = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    with pytest.raises(ConfigError, match=r"'digits' holds image data.*\(e.g. 'bbc-news'\)"):
        resolve(build_config({"method": "fedpft", "task": {"name": "sst2", "data_dir": str(sst2)},
                              "proxy": {"public_corpus": "digits"}}))  # fmt: skip
    # an image model without proxies (ViT) is refused with the families that have them
    with pytest.raises(ConfigError, match="tiny-vit.*bert, roberta, dinov2"):
        image_cfg(data, "fedpft", model={"name": "tiny-vit", "lora": {"r": 4}})


def test_digits_is_an_image_task_of_sklearn_handwriting() -> None:
    task = load_task(TaskConfig(name="optdigits", max_eval_examples=50), seed=3)
    assert task.name == "digits" and task.kind == "image-classification"
    assert task.num_labels == 10 and len(task.eval["eval"]) == 50
    full = load_task(TaskConfig(name="digits"), seed=0)
    assert len(full.train) + len(full.eval["eval"]) == 1797 == len(task.train) + 359
    pixels = task.train[0].pixels  # type: ignore[attr-defined]
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8) and pixels.max() > 200
    again = load_task(TaskConfig(name="digits", max_eval_examples=50), seed=4)
    # the held-out images do not depend on the run's seed
    assert [e.source for e in again.eval["eval"]] == [e.source for e in task.eval["eval"]]  # type: ignore[attr-defined]
    held = {e.source for e in full.eval["eval"]}  # type: ignore[attr-defined]
    assert not held & {e.source for e in task.train}  # type: ignore[attr-defined]


def test_fedpft_defaults_follow_the_task_and_the_family() -> None:
    def fedpft(task: str) -> Config:
        return resolve(build_config({"method": "fedpft", "model": {"name": "tiny-bert"},
                                     "task": {"name": task}}))  # fmt: skip

    cfg = fedpft("sst2")
    assert cfg.model.lora is not None
    assert cfg.model.lora.target_modules == ["query", "key", "value", "attention.output.dense"]
    assert cfg.proxy.public_corpus == "bbc-news"
    # public data is never the clients' task: the next default, or a clear error
    assert fedpft("digits").proxy.public_corpus == "fashion-mnist"
    with pytest.raises(ConfigError, match="set proxy.public_corpus to another text task"):
        fedpft("bbc-news")
