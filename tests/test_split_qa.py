"""Extractive QA through `split`: the span head trains with every codec and both label
placements, what crosses above the cut is one row per real token, evaluation through
the split path is the QA adapter's own (the same answers and SQuAD scores as the uncut
model), and the cloud refuses span labels that do not point at a row's real tokens; split
refuses generation tasks with a config error.
(Loss and gradient equality: test_split_equivalence.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TOKEN, inprocess_pair, make_device, span_batch_for, tiny_cfg, write_squad

from cotune.data import load_task
from cotune.errors import ConfigError
from cotune.link.errors import MalformedMessage
from cotune.link.proto import pb
from cotune.link.transport import InProcessTransport
from cotune.link.wire import to_wire
from cotune.methods.split.problems import problem_for
from cotune.models import load_tokenizer
from cotune.models.span import SpanOutput, build_span_model
from cotune.training import adapter_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("link", "labels"),
    [
        ({"codec": "identity"}, "cloud"),
        ({"codec": "int8"}, "cloud"),
        ({"codec": "int8"}, "device"),
        ({"codec": "sft", "rank": 4}, "cloud"),
        ({"codec": "sft", "rank": 4, "code_format": "int8"}, "device"),
        ({"codec": "pca", "rank": 4}, "device"),
        ({"codec": "topk"}, "cloud"),
        ({"codec": "bf16"}, "device"),
    ],
)
def test_span_head_trains_with_every_codec(link: dict, labels: str) -> None:
    cfg = tiny_cfg("bert", link=link, split={"labels": labels})
    wire: list[tuple[str, bytes]] = []
    device, cloud, _ = inprocess_pair(cfg, problem="span", tap=lambda d, b: wire.append((d, b)))
    batch = span_batch_for("bert")
    if link["codec"] == "pca":
        device.calibrate([span_batch_for("bert", seed=s) for s in range(3)])
    before = {n: p.detach().clone() for n, p in {**device.named, **cloud.named}.items()}
    losses = [device.train_step(batch) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = {**device.named, **cloud.named}
    assert any(not torch.equal(before[n], after[n]) for n in cloud.named)  # the cloud learned
    assert any(not torch.equal(before[n], after[n]) for n in device.named)  # and the device
    assert ("head.weight" in device.named) == (labels == "device")

    real = int(batch["attention_mask"].sum())
    forwards = outputs = 0
    for direction, data in wire:
        msg = (pb.DeviceMessage if direction == "up" else pb.CloudMessage).FromString(data)
        if direction == "up" and msg.WhichOneof("kind") == "forward":
            forwards += 1
            assert msg.forward.HasField("labels") == (labels == "cloud")
            if labels == "cloud":
                assert list(msg.forward.labels.shape) == [3, 2]  # (start, end) per row
        if direction == "down" and msg.WhichOneof("kind") == "result":
            if msg.result.HasField("output"):  # U-shaped: every real token's hidden state
                outputs += 1
                assert list(msg.result.output.shape) == [real, device.hidden_size]
    assert forwards == 3 and outputs == (3 if labels == "device" else 0)

    device.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = device(labels=batch["labels"], **inputs)
    assert isinstance(out, SpanOutput)
    assert out.start_logits.shape == out.end_logits.shape == (3, 7)
    assert out.loss is not None and torch.isfinite(torch.as_tensor(out.loss))
    # only real tokens' rows came down: every padded position holds the same value (the
    # zero the rows were scattered into, or, U-shaped, the head's bias applied to it)
    padding = batch["attention_mask"] == 0
    assert int(padding.sum()) > 1 and out.start_logits[padding].unique().numel() == 1


@pytest.mark.parametrize("labels", ["cloud", "device"])
def test_split_evaluation_is_the_uncut_models(tmp_path: Path, labels: str) -> None:
    """The QA adapter scores the split path exactly as it scores the uncut model:
    the same logits on real tokens, the same answers, EM / F1 and loss."""
    data = write_squad(tmp_path / "squad", n_articles=8)
    cfg = tiny_cfg(
        "bert",
        split={"labels": labels},
        task={"name": "squad", "data_dir": str(data), "split_eval": 0.25,
              "max_eval_examples": 6},
        train={"eval_batch_size": 4},
    )  # fmt: skip
    task = load_task(cfg.task, cfg.seed)
    adapter = adapter_for(task, cfg)
    tokenizer = load_tokenizer(cfg.model.name)
    reference, _, _ = build_span_model(cfg.model, seed=cfg.seed)
    device, cloud, _ = inprocess_pair(cfg, problem="span")

    batch = next(iter(adapter.eval_splits(tokenizer)["eval"].loader))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = reference.eval()(**inputs, labels=batch["labels"])
    got = device.eval()(labels=batch["labels"], **inputs)
    real = batch["attention_mask"].bool()
    for name in ("start_logits", "end_logits"):
        torch.testing.assert_close(getattr(got, name)[real], getattr(want, name)[real],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip

    expected = adapter.evaluate(reference, tokenizer)
    result = adapter.evaluate(device, tokenizer)
    assert {"exact_match", "f1", "loss"} <= set(result.metrics)
    assert result.metrics["exact_match"] == expected.metrics["exact_match"]
    assert result.metrics["f1"] == expected.metrics["f1"]
    assert result.metrics["loss"] == pytest.approx(expected.metrics["loss"], rel=1e-5)
    assert len(result.predictions) == 6
    assert [r["prediction"] for r in result.predictions] == [
        r["prediction"] for r in expected.predictions
    ]
    assert not any(m.training for m in cloud.modules)


def _forward(device, batch):  # type: ignore[no-untyped-def]
    msg, _ = device._forward_message(batch, train=True)
    return msg.forward


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        (torch.tensor([1, 2, 0]), "shape"),  # one position per row, not (start, end)
        (torch.tensor([[0, 1], [2, 3], [1, 3]]), "padding"),  # row 2 has 3 real tokens
        (torch.tensor([[0, 1], [-1, 3], [1, 2]]), "negative"),
        (torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 2.0]]), "dtype"),
    ],
)
def test_cloud_refuses_span_labels_off_the_real_tokens(labels: torch.Tensor, problem: str) -> None:
    cfg = tiny_cfg("bert")
    device, cloud, _ = inprocess_pair(cfg, problem="span")
    fwd = _forward(device, span_batch_for("bert"))
    fwd.labels.CopyFrom(to_wire(labels))
    before = {n: p.detach().clone() for n, p in cloud.named.items()}
    with pytest.raises(MalformedMessage, match="forward.labels"):
        device.transport.request(pb.DeviceMessage(forward=fwd), timeout=30)
    assert cloud.state(0).steps_done == 0
    assert all(torch.equal(before[n], p) for n, p in cloud.named.items())
    device.optimizer.zero_grad(set_to_none=True)
    device.train_step(span_batch_for("bert"))  # the stream carries on
    assert cloud.state(0).steps_done == 1


def test_cloud_refuses_a_span_head_with_other_than_two_outputs() -> None:
    from cotune.link.auth import TokenBook
    from cotune.link.service import CloudEndpoint
    from cotune.methods.split import SplitCloud

    cfg = tiny_cfg("bert")
    endpoint = CloudEndpoint(SplitCloud(cfg), TokenBook({0: TOKEN}))
    device = make_device(cfg, InProcessTransport(endpoint, 0, TOKEN), num_labels=3,
                         problem="span")  # fmt: skip
    with pytest.raises(MalformedMessage, match="span head has 2 outputs, not 3"):
        device.connect(10)


def test_task_kinds_map_to_split_heads() -> None:
    assert problem_for("qa", 0) == ("span", 2)
    assert problem_for("image-classification", 10) == ("classification", 10)
    assert problem_for("classification", 3) == ("classification", 3)
    assert problem_for("regression", 1) == ("regression", 1)
    with pytest.raises(ConfigError, match="split cannot train a task of kind 'generation'"):
        problem_for("generation", 0)


def test_split_refuses_generation_tasks_with_a_config_error() -> None:
    from cotune.config import build_config
    from cotune.methods import resolve

    cfg = build_config({"method": "split", "task": {"name": "e2e"}, "model": {"name": "tiny-gpt2"}})
    with pytest.raises(ConfigError, match="split does not support task kind generation"):
        resolve(cfg)
