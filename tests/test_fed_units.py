"""Federated building blocks without an engine: aggregation, update screening, the
fedkd losses, seeded sampling, message byte counting and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from helpers import tiny_config

from cotune.config import build_config
from cotune.methods import resolve
from cotune.methods.federated.aggregation import check_update, weighted_average
from cotune.methods.federated.data import split_train
from cotune.methods.fedkd import mutual_distillation_losses
from cotune.runtime.federated.checkpoint import ServerCheckpoint, load_checkpoint, save_checkpoint
from cotune.runtime.federated.client_sampling import sample_partitions
from cotune.runtime.federated.records import message_bytes, messages_bytes, to_arrays

# ----------------------------------------------------------------------- aggregation


def test_weighted_average_weights_by_examples() -> None:
    a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32)}
    out = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32


def test_weighted_average_of_one_update_is_that_update() -> None:
    a = {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    assert np.array_equal(weighted_average([a], [17])["w"], a["w"])


@pytest.mark.parametrize(
    ("update", "needle"),
    [
        ({"w": np.array([1.0, np.nan], dtype=np.float32), "b": np.zeros(1, np.float32)}, "NaN"),
        ({"w": np.array([1.0, np.inf], dtype=np.float32), "b": np.zeros(1, np.float32)}, "Inf"),
        ({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}, "shape"),
        ({"w": np.zeros(2, np.float32)}, "names"),
        ({"w": np.zeros(2, np.int64), "b": np.zeros(1, np.float32)}, "dtype"),
    ],
)
def test_check_update_rejects_bad_updates(update: dict, needle: str) -> None:
    reference = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    reason = check_update(update, reference)
    assert reason is not None and needle in reason


def test_check_update_accepts_a_good_update() -> None:
    reference = {"w": np.zeros(2, np.float32)}
    assert check_update({"w": np.ones(2, np.float32)}, reference) is None


# ----------------------------------------------------------------------------- fedkd


def test_kd_losses_match_the_definition() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    temp = 3.0
    out = mutual_distillation_losses(s, t, y, temp)
    p_t = F.softmax(t / temp, -1)
    p_s = F.softmax(s / temp, -1)
    kl_ts = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * temp**2  # KL(p_t || p_s)
    kl_st = (p_s * (p_s.log() - p_t.log())).sum(-1).mean() * temp**2
    ce_s, ce_t = F.cross_entropy(s, y), F.cross_entropy(t, y)
    scale = 1 / (ce_s + ce_t + 1)
    torch.testing.assert_close(out.kl_student, kl_ts)
    torch.testing.assert_close(out.kl_teacher, kl_st)
    torch.testing.assert_close(out.student, ce_s + scale * kl_ts)
    torch.testing.assert_close(out.teacher, ce_t + scale * kl_st)


def test_kd_scale_is_detached_and_each_kl_trains_one_side() -> None:
    s = torch.randn(4, 2, requires_grad=True)
    t = torch.randn(4, 2, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    out = mutual_distillation_losses(s, t, y, 2.0)
    assert not out.scale.requires_grad
    (g_t,) = torch.autograd.grad(out.kl_student, [t], allow_unused=True)
    assert g_t is None  # the student's KL does not move the teacher
    (g_s,) = torch.autograd.grad(out.kl_teacher, [s], allow_unused=True)
    assert g_s is None


def test_kd_kl_vanishes_when_the_two_agree() -> None:
    logits = torch.randn(5, 4)
    out = mutual_distillation_losses(logits, logits.clone(), torch.zeros(5, dtype=torch.long), 2.0)
    assert float(out.kl_student) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ data and sampling


def test_sampling_is_seeded_by_round_and_independent_of_node_ids() -> None:
    parts = list(range(100))
    a = sample_partitions(parts, 0.1, seed=3, server_round=2)
    assert len(a) == 10 and a == sample_partitions(list(reversed(parts)), 0.1, 3, 2)
    assert a != sample_partitions(parts, 0.1, seed=3, server_round=3)
    assert sample_partitions([4, 7], 1.0, 0, 1) == [4, 7]


def test_fedkd_keeps_a_public_share_out_of_the_clients(tmp_path: Path) -> None:
    labels = [i % 2 for i in range(100)]
    cfg = tiny_config(tmp_path, method="fedkd", federated={"clients": 4})
    split = split_train(labels, cfg)
    assert len(split.public) == 20
    held = sorted(i for c in split.clients for i in c)
    assert sorted(held + split.public) == list(range(100))
    lora = split_train(labels, tiny_config(tmp_path, federated={"clients": 4}))
    assert lora.public == [] and sum(lora.sizes()) == 100


# ------------------------------------------------------------------- bytes on the wire


def test_message_bytes_grow_with_the_payload_and_count_serialised_content(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 5), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # set by the engines in a real run
    rng = np.random.default_rng(0)
    small = {"w": rng.normal(size=(10,)).astype(np.float32)}
    large = {"w": rng.normal(size=(10_000,)).astype(np.float32)}

    def msg(state: dict) -> Message:
        content = RecordDict({"arrays": to_arrays(state), "config": ConfigRecord({"r": 1})})
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)

    b_small, b_large = message_bytes(msg(small)), message_bytes(msg(large))
    assert b_small > 40  # the 40 data bytes plus headers and names
    assert b_large - b_small == pytest.approx(4 * (10_000 - 10), rel=0.01)
    # memoised sizes across messages give the same total as sizing each on its own
    batch = [msg(large), msg(small), msg(large)]
    assert messages_bytes(batch) == sum(message_bytes(m) for m in batch)


# ------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_keeps_order_values_and_totals(tmp_path: Path) -> None:
    state = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    save_checkpoint(
        tmp_path, ServerCheckpoint(2, state, {"t": np.zeros(1, np.float32)}, {"bytes_up": 7})
    )
    save_checkpoint(tmp_path, ServerCheckpoint(3, state, {}, {"bytes_up": 9}))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.round == 3 and ckpt.totals == {"bytes_up": 9}
    assert list(ckpt.global_state) == ["b", "a"]
    assert np.array_equal(ckpt.global_state["a"], state["a"]) and ckpt.hook_state == {}
    assert load_checkpoint(tmp_path / "nothing") is None


def test_fedavg_rejects_lora_and_fedlora_defaults_it() -> None:
    from cotune.errors import ConfigError

    with pytest.raises(ConfigError, match="fedavg"):
        resolve(build_config({"method": "fedavg", "model": {"lora": {"r": 4}}}))
    assert resolve(build_config({"method": "fedlora"})).model.lora is not None
    assert math.isclose(resolve(build_config({"method": "fedlora"})).resolved_lr(), 2e-3)


def test_inline_engine_reports_no_device_peak() -> None:
    """Inline clients train in the server's process: their measured peak is that
    process's, so it is kept as `inline_process_peak_bytes`, not as a device's."""
    from cotune.runtime.federated.engine import to_method_result

    result = {"metrics": {"accuracy": 0.5}, "rounds": 2, "rounds_completed": 2,
              "bytes_up": 10, "bytes_down": 20, "client_peak_rss_bytes": 123_000_000,
              "client_saved_activation_bytes": 5, "trainable_device": 1,
              "trainable_cloud": 0}  # fmt: skip
    inline = to_method_result("inline", result)
    assert inline.device_peak_bytes is None
    assert inline.extra["inline_process_peak_bytes"] == 123_000_000
    simulated = to_method_result("simulation", result)
    assert simulated.device_peak_bytes == 123_000_000
    assert "inline_process_peak_bytes" not in simulated.extra
