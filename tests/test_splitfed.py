"""splitfed: devices train concurrently; per_client + SGD + aggregate_every=1 equals one
centralized SGD step on the concatenated batch; adapter averaging is counted."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import splitfed_config, write_e2e

from cotune.data.pairs import PairCollator, encode_pairs
from cotune.link.errors import MalformedMessage
from cotune.methods import NullRecorder, get_spec, resolve
from cotune.methods.splitfed import Aggregator
from cotune.methods.splitfed.cloud import LMSession, SplitFedCloud
from cotune.models.causal_lm import build_lm
from cotune.runtime.split.launch import run_in_process


def simulate(cfg):  # type: ignore[no-untyped-def]
    """All devices as threads against an in-process cloud (what `cotune run` does with
    runtime.transport = "inprocess"): the cloud service and each device's outcome."""
    cloud, outcomes = run_in_process(resolve(cfg), get_spec("splitfed").runs, NullRecorder(), None)  # type: ignore[arg-type]
    return cloud, {o.device_id: o for o in outcomes}


def test_per_client_round_equals_one_centralized_sgd_step(tmp_path: Path) -> None:
    data_dir = write_e2e(tmp_path / "e2e", n_train=6)
    cfg = splitfed_config(
        data_dir,
        train={"optimizer": "sgd", "lr": 0.5, "warmup_ratio": 0.0, "max_grad_norm": None},
        split={"server": "per_client"},
        link={"codec": "identity"},
    )
    cloud, results = simulate(cfg)
    reports = [results[i] for i in range(3)]
    assert all(r.result.extra["steps"] == 1 and r.result.extra["rounds"] == [3] for r in reports)
    for r in reports[1:]:  # every device holds the same averaged adapter
        for n, t in r.state.items():
            assert torch.equal(t, reports[0].state[n])
    split = {**reports[0].state, **cloud.trainable_state()}

    # the reference: the uncut model, one SGD step on all six examples as one batch
    model, tokenizer, _ = build_lm(
        cfg.model, seed=cfg.seed, label_smoothing=cfg.train.label_smoothing
    )
    from cotune.methods.federated.data import task_for

    data = encode_pairs(task_for(cfg).train, tokenizer, cfg.train.max_seq_len)
    assert len({len(item["input_ids"]) for item in data}) == 1  # equal token counts
    batch = PairCollator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    model.train()
    model(**batch).loss.backward()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(named) == set(split)
    moved = 0
    for n, p in named.items():
        expected = p.detach() - 0.5 * p.grad
        torch.testing.assert_close(split[n], expected, rtol=1e-5, atol=1e-6, msg=n)
        moved += int(not torch.equal(expected, p.detach()))
    assert moved >= len(named) // 2  # the step changed the adapters (not a vacuous check)


def test_devices_train_concurrently_and_averaging_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = write_e2e(tmp_path / "e2e", n_train=9)
    cfg = splitfed_config(
        data_dir,
        train={"steps": 4, "batch_size": 1},
        split={"server": "shared"},
        federated={"aggregate_every": 2},
    )
    # Each training step reaches the cloud only once every device's step has: the steps
    # overlap whatever the scheduler does, and devices that could only take turns would
    # never all get there (the barrier breaks after its timeout and the devices fail).
    together = threading.Barrier(3, timeout=120)
    handle = LMSession.handle

    def handle_together(self: LMSession, msg: Any) -> Any:
        if msg.WhichOneof("kind") == "forward" and msg.forward.backward:
            together.wait()
        return handle(self, msg)

    monkeypatch.setattr(LMSession, "handle", handle_together)
    cloud, results = simulate(cfg)
    reports = [results[i] for i in range(3)]
    assert all(r.result.extra["steps"] == 4 and r.result.extra["rounds"] == [3, 3] for r in reports)
    # steps of different devices overlap in time: concurrency, not turns
    overlaps = 0
    for a in reports:
        for b in reports:
            if a.device_id < b.device_id:
                overlaps += sum(
                    1
                    for s0, e0 in a.result.extra["intervals"]
                    for s1, e1 in b.result.extra["intervals"]
                    if s0 < e1 and s1 < e0
                )
    assert overlaps >= 3, [r.result.extra["intervals"] for r in reports]
    # shared cloud: one model took every device's steps; adapters went both ways, counted
    assert cloud.steps == 12 and cloud.shared is not None
    for r in reports:
        meter = r.result.extra["meter"]
        phase = meter["by_phase"]["aggregate"]
        adapter_bytes = sum(t.numel() * 4 for t in r.state.values())
        assert phase["up"] > 2 * adapter_bytes and phase["down"] > 2 * adapter_bytes
        assert meter["bytes_up"] == sum(p["up"] for p in meter["by_phase"].values())


def test_aggregator_weights_by_data_size_and_skips_departed_devices() -> None:
    import numpy as np

    agg = Aggregator(expected=3, timeout=30)
    for d in (0, 1, 2):
        agg.join(d)
    agg.leave(2)  # e.g. killed: not waited for
    out = {}

    def submit(d: int, value: float, weight: float) -> None:
        out[d] = agg.submit(1, d, {"w": np.full(2, value, dtype=np.float32)}, weight)

    threads = [
        threading.Thread(target=submit, args=(0, 1.0, 1.0)),
        threading.Thread(target=submit, args=(1, 4.0, 3.0)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    avg, participants = out[0]
    assert participants == 2 and out[1][1] == 2
    np.testing.assert_allclose(avg["w"], [3.25, 3.25])  # (1*1 + 4*3) / 4


def test_cloud_refuses_malformed_adapter_state(tmp_path: Path) -> None:
    from cotune.link.proto import pb
    from cotune.link.wire import to_wire

    cfg = splitfed_config(write_e2e(tmp_path / "e2e", n_train=6), split={"server": "per_client"})
    cloud = SplitFedCloud(cfg)
    session = cloud.open_session(0)
    cloud.cloud_for(0).build(30522, "causal_lm", 1)
    session.greeted = True
    agg = pb.Aggregate(round=1, weight=1.0)
    agg.state["not.a.parameter"].CopyFrom(to_wire(torch.zeros(2)))
    with pytest.raises(MalformedMessage, match="tensor names differ"):
        session.handle(pb.DeviceMessage(aggregate=agg))
