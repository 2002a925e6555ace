"""Faults: a client that raises or overruns the round timeout does not stop the round,
and updates with NaN/Inf or wrong shapes are rejected; the rest are aggregated and
every failure is logged. Runs the real ServerApp and ClientApp on the in-process grid
(the fault-injecting Flower mod wraps the standard ClientApp)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from helpers import tiny_config, tiny_fedlora_run_args, write_sst2

from cotune.cli.main import main
from cotune.errors import ConfigError
from cotune.methods.federated.client import local_train
from cotune.methods.federated.global_model import GlobalModel
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.apps import build_client_app
from cotune.runtime.federated.checkpoint import load_checkpoint
from cotune.runtime.federated.engine import run_federated
from cotune.runtime.federated.faults import FAULT_KEY, FAULT_UNTIL_KEY, faulty_clients, mark

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


# ------------------------------------------------------------- [federated.faults]


def test_faulty_clients_are_a_seeded_share_of_the_sampled() -> None:
    sampled = list(range(0, 1000, 10))  # 100 partitions
    kinds = faulty_clients(sampled, 0.05, "raise", seed=0, rnd=1)
    assert len(kinds) == 5 and set(kinds) <= set(sampled)
    assert set(kinds.values()) == {"raise"}
    assert faulty_clients(sampled, 0.05, "raise", seed=0, rnd=1) == kinds  # reproducible
    assert faulty_clients(sampled, 0.05, "raise", seed=0, rnd=2) != kinds  # per round
    assert faulty_clients(sampled, 0.05, "raise", seed=1, rnd=1) != kinds  # per seed
    assert len(faulty_clients(sampled[:10], 0.05, "raise", 0, 1)) == 1  # rounded up
    assert faulty_clients(sampled, 0.0, "raise", 0, 1) == {}
    mixed = faulty_clients(sampled, 0.5, "mixed", seed=0, rnd=1)
    assert len(mixed) == 50 and set(mixed.values()) == {"raise", "timeout"}


def test_marks_go_to_the_chosen_messages_only(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 5), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # set by the engines in a real run
    shared = ConfigRecord({"server-round": 3})
    msgs = [
        Message(RecordDict({"config": shared}), dst_node_id=node, message_type=MessageType.TRAIN)
        for node in (11, 12, 13)
    ]
    mark(msgs, {1: "raise", 2: "timeout"}, {11: 0, 12: 1, 13: 2}, deadline=1234.5)
    configs = [m.content.config_records["config"] for m in msgs]
    assert FAULT_KEY not in configs[0] and FAULT_KEY not in shared  # the shared record is kept
    assert configs[1][FAULT_KEY] == "raise" and FAULT_UNTIL_KEY not in configs[1]
    assert configs[2][FAULT_KEY] == "timeout" and configs[2][FAULT_UNTIL_KEY] == 1234.5
    assert configs[2]["server-round"] == 3


def test_a_timeout_config_needs_a_round_deadline(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=40)
    with pytest.raises(ConfigError, match="round_timeout"):
        tiny_config(data, federated={"faults": {"fail_fraction": 0.1, "mode": "timeout"}})


@pytest.mark.slow
def test_injected_failures_are_survived_and_counted(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=120)
    faults = {"fail_fraction": 0.5, "mode": "raise", "seed": 3}
    cfg = tiny_config(data, federated={"clients": 4, "rounds": 2, "faults": faults})
    run_dir = tmp_path / "run"
    result = run_federated(cfg, run_dir, engine="inline")
    assert result.extra["rounds_completed"] == 2
    records = read_jsonl(run_dir / "metrics.jsonl")
    for rnd, record in enumerate(records, start=1):
        chosen = faulty_clients(list(range(4)), 0.5, "raise", 3, rnd)
        assert record["faults_injected"] == 2 == len(chosen)
        assert (record["clients_ok"], record["clients_failed"]) == (2, 2)
        failed = {
            r["partition"]
            for r in read_jsonl(run_dir / "train.jsonl")
            if r.get("event") == "client_failed" and r["round"] == rnd
        }
        assert failed == set(chosen)
    events = [r for r in read_jsonl(run_dir / "train.jsonl") if r.get("event")]
    assert all("injected failure (federated.faults)" in r["reason"] for r in events)


@pytest.mark.slow
def test_simulation_engine_survives_raised_and_timed_out_clients(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The user's path: `cotune run` on the simulation engine (flwr run against a
    loopback simulation SuperLink), one client raising and one holding its reply past
    the round's deadline in a round of four."""
    run_dir = tmp_path / "run"
    args = tiny_fedlora_run_args(
        tmp_path, run_dir, "federated.clients=4", "federated.rounds=1",
        "federated.round_timeout=45", "federated.faults.fail_fraction=0.5",
        "federated.faults.mode=mixed", "federated.faults.seed=1", "runtime.export=false",
    )  # fmt: skip
    code, err = main(args), capsys.readouterr().err
    assert code == 0, err
    assert "[eval] round 1/1" in err  # the ServerApp's round, echoed by cotune run
    kinds = faulty_clients([0, 1, 2, 3], 0.5, "mixed", 1, 1)
    assert sorted(kinds.values()) == ["raise", "timeout"]  # the seed gives one of each
    (record,) = read_jsonl(run_dir / "metrics.jsonl")
    assert record["faults_injected"] == 2
    assert (record["clients_ok"], record["clients_failed"], record["clients_timed_out"]) == (
        2,
        1,
        1,
    )
    events = {r["partition"]: r["event"] for r in read_jsonl(run_dir / "train.jsonl")}
    assert events == {
        p: "client_failed" if k == "raise" else "client_timed_out" for p, k in kinds.items()
    }
    # it went through a Flower SuperLink in simulation mode, not run_simulation
    log = (run_dir / "logs" / "superlink.log").read_text()
    assert "Created run" in log
