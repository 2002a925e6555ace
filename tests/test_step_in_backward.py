"""`memory.step_in_backward`: each parameter steps inside backward the moment its
gradient is complete, and the gradient is freed. The updates are the plain optimiser's
(AdamW and SGD, with a learning-rate schedule), the gradients of layers backward has
left are gone while it goes on, and the config refuses global-norm clipping with it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import batch_for, tiny_config, write_sst2
from torch import nn

from cotune.cli.main import main
from cotune.config import ModelConfig, build_config, to_toml
from cotune.errors import ConfigError
from cotune.memory import apply_memory_option, dense_embedding_grads, sparse_embedding_grads
from cotune.memory.measure import HeapSampler
from cotune.models import build_classifier
from cotune.training import ModelStep, make_optimizer, make_schedule, optim
from cotune.training.optim import StepInBackward

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(optimizer: str = "adamw", in_backward: bool = False, lora: bool = False):  # type: ignore[no-untyped-def]
    return build_config(
        {
            "model": {"name": "tiny-bert", "lora": {"r": 4} if lora else None},
            "train": {"optimizer": optimizer, "lr": 1e-2, "max_grad_norm": 0, "steps": 4,
                      "warmup_ratio": 0.25},
            "memory": {"step_in_backward": in_backward},
        }
    )  # fmt: skip


def _model(lora: bool = False) -> nn.Module:
    model, _, _ = build_classifier(ModelConfig(name="tiny-bert", lora={"r": 4} if lora else None),
                                   3, seed=0)  # fmt: skip
    return model


def _train(model: nn.Module, optimizer: str, in_backward: bool, steps: int = 4) -> nn.Module:
    cfg = _cfg(optimizer, in_backward)
    opt = make_optimizer(model.parameters(), cfg)
    assert isinstance(opt, StepInBackward) == in_backward
    step = ModelStep(model, opt, make_schedule(opt, steps, cfg.train), max_grad_norm=None)
    torch.manual_seed(0)  # dropout draws the same masks in both runs
    for i in range(steps):
        step(batch_for("bert", b=4, length=12, seed=i))
    return model


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("lora", [False, True])
def test_updates_equal_the_plain_optimiser(optimizer: str, lora: bool) -> None:
    base = _model(lora)
    plain = _train(copy.deepcopy(base), optimizer, in_backward=False)
    inside = _train(copy.deepcopy(base), optimizer, in_backward=True)
    moved = 0
    for (name, a), (_, b), (_, c) in zip(
        plain.named_parameters(), inside.named_parameters(), base.named_parameters(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
        moved += int(not torch.equal(a, c))
    assert moved > 0  # training changed the weights: the comparison is not vacuous
    for p in inside.parameters():
        assert p.grad is None  # every gradient was freed as its parameter stepped


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_sparse_embedding_gradients_step_as_the_dense_ones(optimizer: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With step_in_backward the embedding tables get sparse gradients (the rows the
    batch used); AdamW steps them block of rows by block of rows (here 100 rows a block,
    so several blocks), SGD takes them as they are: the parameters end where the plain
    optimiser's dense steps put them, rows the batches never used included (AdamW's
    weight decay and moments move them too). The tables are compared tightly; the other
    weights get a looser bound, because the sparse gradient sums a repeated token's rows
    in another order and, from the second step on, AdamW amplifies that rounding in
    weights whose exact gradient is zero (the key bias)."""
    base = _model()
    tables = [m for m in base.modules() if isinstance(m, nn.Embedding)]
    width = tables[0].weight.shape[1]
    monkeypatch.setattr(optim, "SPARSE_BLOCK_ELEMS", 100 * width)
    assert tables[0].weight.shape[0] > 300  # the word table spans several blocks
    plain = _train(copy.deepcopy(base), optimizer, in_backward=False)
    model = copy.deepcopy(base)
    assert sparse_embedding_grads(model) == len(tables) >= 2
    assert sparse_embedding_grads(model) == 0  # once
    seen: list[bool] = []
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.is_sparse))
    inside = _train(model, optimizer, in_backward=True)
    assert len(seen) == 4 * len(tables) and all(seen)
    shapes = {tuple(t.weight.shape) for t in tables}
    for (name, a), (_, b) in zip(plain.named_parameters(), inside.named_parameters(), strict=True):
        tight = tuple(a.shape) in shapes
        torch.testing.assert_close(b, a, rtol=1e-6 if tight else 1e-3,
                                   atol=1e-7 if tight else 1e-4, msg=name)  # fmt: skip
        assert b.grad is None
    word = tables[0].weight
    used = torch.cat([batch_for("bert", b=4, length=12, seed=i)["input_ids"] for i in range(4)])
    unused = torch.ones(word.shape[0], dtype=torch.bool)
    unused[used.unique()] = False
    if optimizer == "adamw":  # decay moves the rows no batch used, as in the dense step
        start = dict(base.named_parameters())
        name = next(n for n, p in inside.named_parameters() if p.shape == word.shape)
        moved = dict(inside.named_parameters())[name][unused] != start[name][unused]
        assert moved.all()
    dense_embedding_grads(inside)
    assert not any(m.sparse for m in inside.modules() if isinstance(m, nn.Embedding))


def test_step_in_backward_makes_trainable_tables_sparse_and_counts_their_bytes() -> None:
    cfg = _cfg(in_backward=True)
    model = _model()
    apply_memory_option(model, cfg.memory)
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert tables and all(m.sparse for m in tables)
    frozen = _model(lora=True)  # LoRA freezes the tables: nothing to make sparse
    assert sparse_embedding_grads(frozen) == 0
    word = tables[0].weight
    sampler = HeapSampler([word])
    batch = batch_for("bert", b=2, length=5, seed=0)
    with sampler:
        model(**batch).loss.backward()
    rows = word.grad._values().shape[0]
    assert word.grad.is_sparse and rows <= 2 * 5
    # the sampler counts the sparse gradient's own bytes, not the table's
    assert sampler._grads == rows * word.shape[1] * 4 + rows * 8


def test_gradients_of_layers_backward_has_left_are_gone_while_it_goes_on() -> None:
    model = _model()
    cfg = _cfg(in_backward=True)
    opt = make_optimizer(model.parameters(), cfg)
    # the word embeddings: the last gradient backward completes
    embeddings = next(p for n, p in model.named_parameters() if "word_embeddings" in n)
    live: list[int] = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    # registered after the optimiser's hook: runs once the embeddings have stepped
    embeddings.register_post_accumulate_grad_hook(
        lambda p: live.append(sum(q.grad is not None for q in trainable))
    )
    before = embeddings.detach().clone()
    batch = batch_for("bert", b=4, length=12)
    model(**batch).loss.backward()
    assert live == [0]  # no parameter holds a gradient when backward reaches the bottom
    assert not torch.equal(before, embeddings)  # and the embeddings did step
    assert opt.state[embeddings]["step"] == 1
    assert len(opt.state) == len(trainable)  # every parameter has its optimiser state
    opt.step()  # a no-op: nothing steps twice
    assert opt.state[embeddings]["step"] == 1


def test_a_schedule_sets_the_learning_rate_every_parameter_steps_with() -> None:
    model = _model()
    cfg = _cfg(in_backward=True)
    opt = make_optimizer(model.parameters(), cfg)
    assert isinstance(opt, StepInBackward)
    sched = make_schedule(opt, 4, cfg.train)
    lrs = {g["lr"] for inner in opt.inner.values() for g in inner.param_groups}
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(1e-2 / 1)  # warmup: step 1 of 1
    for _ in range(2):
        opt.step()  # a no-op, called as the training step does, before the schedule's
        sched.step()
    # step 2 of 4: linear decay to (4 - 2) / 3 of the peak
    lrs = {g["lr"] for inner in opt.inner.values() for g in inner.param_groups}
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(1e-2 * 2 / 3)
    # weight decay stays off for biases and norms, as in the plain optimiser
    decays = {p.ndim >= 2: opt.inner[p].param_groups[0]["weight_decay"] for p in opt.inner}
    assert decays == {True: 0.01, False: 0.0}


def test_config_refuses_clipping_with_step_in_backward(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"set train.max_grad_norm = 0"):
        build_config({"memory": {"step_in_backward": True}})
    ok = build_config({"memory": {"step_in_backward": True}, "train": {"max_grad_norm": 0}})
    # 0 survives the resolved config's round trip (unset would read back as 1.0)
    assert build_config(__import__("tomllib").loads(to_toml(ok))).train.max_grad_norm == 0
    data = write_sst2(tmp_path, n_train=32)
    code = main(["run", "--set", "task.name=glue/sst2", "--set", f"task.data_dir={data}",
                 "--set", "model.name=tiny-bert", "--set", "memory.step_in_backward=true",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "train.max_grad_norm = 0" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_fedlora_run_with_step_in_backward_matches_the_plain_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cotune.report.run_folder import read_jsonl
    from cotune.runtime.federated.engine import run_federated

    data = write_sst2(tmp_path, n_train=64)
    runs = {}
    for flag in (False, True):
        cfg = tiny_config(data, train={"max_grad_norm": 0}, memory={"step_in_backward": flag})
        run_federated(cfg, tmp_path / str(flag), engine="inline")
        runs[flag] = read_jsonl(tmp_path / str(flag) / "metrics.jsonl")
    assert [r["accuracy"] for r in runs[True]] == [r["accuracy"] for r in runs[False]]
    assert [r["train_loss"] for r in runs[True]] == pytest.approx(
        [r["train_loss"] for r in runs[False]], rel=1e-5
    )
