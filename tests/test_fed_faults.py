"""Faults: a client that raises or overruns the round timeout does not stop the round,
and updates with NaN/Inf or wrong shapes are rejected; the rest are aggregated and
every failure is logged. Runs the real ServerApp and ClientApp on the in-process grid
(the fault-injecting Flower mod wraps the standard ClientApp)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Message, MessageType, MetricRecord, RecordDict
from helpers import tiny_config, write_sst2

from cotune.methods.federated.client import local_train
from cotune.methods.federated.global_model import GlobalModel
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.apps import build_client_app
from cotune.runtime.federated.checkpoint import load_checkpoint
from cotune.runtime.federated.engine import run_federated

# The round's deadline: the honest clients' work (well under a second here) must fit in
# it, on a loaded machine too. The slow client does not sleep past it: it is held until
# the round is over, so its reply always comes after the deadline.
ROUND_TIMEOUT = 30.0
ROUND_OVER = threading.Event()


def _poison(reply: Message, how: str) -> Message:
    arrays = reply.content["arrays"]
    name = next(iter(arrays))
    value = arrays[name].numpy().copy()
    if how == "nan":
        value.flat[0] = np.nan
    else:
        value = np.concatenate([value, value[:1]], axis=0)  # one row too many
    arrays[name] = Array(value)
    return reply


def faulty(message: Message, context, call_next):  # type: ignore[no-untyped-def]
    """Partition 0 is honest; 1 raises; 2 sends NaN; 3 a wrong shape; 4 is too slow."""
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    part = int(context.node_config["partition-id"])
    if part == 1:
        raise RuntimeError("injected client failure")
    if part == 4:
        ROUND_OVER.wait()  # never touches the model: the round has moved on
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=message)
    reply = call_next(message, context)
    return _poison(reply, "nan" if part == 2 else "shape") if part in (2, 3) else reply


@pytest.mark.slow
def test_failed_slow_and_bad_clients_do_not_stop_the_round(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=100)
    cfg = tiny_config(data, federated={"clients": 5, "rounds": 1, "round_timeout": ROUND_TIMEOUT})
    run_dir = tmp_path / "run"
    ROUND_OVER.clear()
    try:
        result = run_federated(cfg, run_dir, client_app=build_client_app([faulty]), engine="inline")
    finally:
        ROUND_OVER.set()  # the abandoned client's thread ends; its reply is dropped
    assert result.extra["rounds_completed"] == 1
    (record,) = read_jsonl(run_dir / "metrics.jsonl")
    assert (record["clients_sampled"], record["clients_ok"]) == (5, 1)
    assert (record["clients_failed"], record["clients_rejected"], record["clients_timed_out"]) == (
        1,
        2,
        1,
    )
    events = {r["partition"]: r for r in read_jsonl(run_dir / "train.jsonl") if "event" in r}
    assert (
        events[1]["event"] == "client_failed" and "injected client failure" in events[1]["reason"]
    )
    assert events[2]["event"] == "update_rejected" and "NaN" in events[2]["reason"]
    assert events[3]["event"] == "update_rejected" and "shape" in events[3]["reason"]
    assert events[4]["event"] == "client_timed_out"
    assert 0 not in events

    # Only the honest client's update was aggregated: the new global state is exactly it.
    honest = local_train(cfg, 0, GlobalModel(cfg).state(), 1).state
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and ckpt.round == 1
    for name, value in honest.items():
        assert np.array_equal(ckpt.global_state[name], value), name
