"""fedlora with per-device LoRA ranks (HetLoRA): the rank-aware aggregation against
hand-computed values, its reduction to plain fedlora, the scale that makes a device's
adapter the first r terms of the global one, the fleet config and its errors, and a
tiny-bert run of three devices of ranks 2, 4 and 8."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, write_sst2

from cotune.cli.main import main
from cotune.config import build_config, load_config, to_toml
from cotune.errors import ConfigError
from cotune.methods import resolve
from cotune.methods.federated.aggregation import (
    rank_average,
    rank_axis,
    state_rank,
    truncate_rank,
    weighted_average,
)
from cotune.methods.federated.client import client_adapter
from cotune.methods.federated.state import get_state, set_state
from cotune.methods.fedlora import device_config, device_ranks
from cotune.runtime.federated import run_federated
from cotune.runtime.federated.checkpoint import load_checkpoint

A = "enc.layer.0.query.lora_A.default.weight"  # peft's names: A is r x in, B is out x r
B = "enc.layer.0.query.lora_B.default.weight"
HEAD = "head.modules_to_save.default.weight"


def f32(x: object) -> np.ndarray:
    return np.array(x, dtype=np.float32)


# a device of rank 1 (weight 1) and one of rank 2 (weight 3); the global rank is 2
RANK1 = {A: f32([[1, 2, 3]]), B: f32([[4], [8]]), HEAD: f32([1, 1])}
RANK2 = {A: f32([[5, 6, 7], [1, 1, 1]]), B: f32([[0, 2], [4, 6]]), HEAD: f32([5, 9])}
GLOBAL = {A: np.full((2, 3), 9, np.float32), B: np.full((2, 2), 9, np.float32), HEAD: f32([0, 0])}


# ------------------------------------------------------------------- the rule by hand


def test_rank_axis_follows_peft_names() -> None:
    assert rank_axis(A) == 0 and rank_axis(B) == 1 and rank_axis(HEAD) is None
    assert rank_axis("x.lora_embedding_A.default") == 0
    assert rank_axis("x.lora_embedding_B.default") == 1
    assert rank_axis("x.my_lora_Alpha.weight") is None


def test_zero_pad_average_is_hetlora_by_hand() -> None:
    out = rank_average([RANK1, RANK2], [1, 3], GLOBAL, "zero_pad")
    # component 0: (1 x rank1 + 3 x rank2) / 4; component 1: (3 x rank2 + 1 x zeros) / 4
    np.testing.assert_array_equal(out[A], f32([[4, 5, 6], [0.75, 0.75, 0.75]]))
    np.testing.assert_array_equal(out[B], f32([[1, 1.5], [5, 4.5]]))
    np.testing.assert_array_equal(out[HEAD], f32([4, 7]))  # (1 x [1, 1] + 3 x [5, 9]) / 4
    assert all(out[k].dtype == np.float32 for k in out)


def test_rank_wise_average_by_hand() -> None:
    out = rank_average([RANK1, RANK2], [1, 3], GLOBAL, "rank_wise")
    # component 1 is held only by the rank-2 device: its own values
    np.testing.assert_array_equal(out[A], f32([[4, 5, 6], [1, 1, 1]]))
    np.testing.assert_array_equal(out[B], f32([[1, 2], [5, 6]]))
    np.testing.assert_array_equal(out[HEAD], f32([4, 7]))


def test_a_component_no_update_holds() -> None:
    """Only the rank-1 device reported: zero padding zeroes component 1, rank-wise
    keeps the global model's."""
    zero = rank_average([RANK1], [1], GLOBAL, "zero_pad")
    np.testing.assert_array_equal(zero[A], f32([[1, 2, 3], [0, 0, 0]]))
    np.testing.assert_array_equal(zero[B], f32([[4, 0], [8, 0]]))
    kept = rank_average([RANK1], [1], GLOBAL, "rank_wise")
    np.testing.assert_array_equal(kept[A], f32([[1, 2, 3], [9, 9, 9]]))
    np.testing.assert_array_equal(kept[B], f32([[4, 9], [8, 9]]))


@pytest.mark.parametrize("rule", ["zero_pad", "rank_wise"])
def test_equal_ranks_are_plain_fedlora_bit_for_bit(rule: str) -> None:
    rng = np.random.default_rng(0)
    shapes = {A: (4, 6), B: (5, 4), HEAD: (3, 5)}
    states = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)
    ]
    weights = [17, 5, 40]
    plain = weighted_average(states, weights)
    ranked = rank_average(states, weights, states[0], rule)
    for name in shapes:
        assert ranked[name].tobytes() == plain[name].tobytes(), name


def test_truncation_takes_the_first_components() -> None:
    cut = truncate_rank(RANK2, 1)
    np.testing.assert_array_equal(cut[A], f32([[5, 6, 7]]))
    np.testing.assert_array_equal(cut[B], f32([[0], [4]]))
    assert cut[HEAD] is RANK2[HEAD]
    assert state_rank(cut) == 1 and state_rank(RANK2) == 2 and state_rank({HEAD: f32([1])}) is None
    with pytest.raises(ValueError, match="rank 1"):
        truncate_rank(RANK1, 2)


# ------------------------------------------------------------- devices and their scale


def test_a_device_adapter_is_the_first_r_terms_of_the_global_one(tmp_path: Path) -> None:
    """Device rank 2 of a rank-8 fleet: loaded with the global state cut to rank 2, its
    model computes what the global model computes with components 2..7 zeroed."""
    cfg = tiny_config(write_sst2(tmp_path), federated={"clients": 3, "client_ranks": [2, 4, 8]})
    assert cfg.model.lora is not None and cfg.model.lora.r == 8
    own = device_config(cfg, 0)
    assert own.model.lora is not None
    assert (own.model.lora.r, own.model.lora.alpha) == (2, cfg.model.lora.alpha * 2 / 8)
    assert device_config(cfg, 2) is cfg  # the largest rank is the global adapter itself
    torch.manual_seed(0)
    glob, _ = client_adapter(cfg).build_model()
    state = {k: np.random.default_rng(1).standard_normal(v.shape).astype(np.float32) * 0.1
             for k, v in get_state(glob).items()}  # fmt: skip
    dev, _ = client_adapter(own).build_model()
    set_state(dev, truncate_rank(state, 2))
    set_state(glob, rank_average([truncate_rank(state, 2)], [1], state, "zero_pad"))
    glob.eval()
    dev.eval()
    ids = torch.randint(1000, 2000, (3, 9), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(dev(**batch).logits, glob(**batch).logits)


def test_fleet_file_is_read_into_devices_and_cycled(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text(
        '[[device]]\nname = "phone"\nrank = 4\nmemory_mib = 512\nup_mbps = 2\n'
        'down_mbps = 20\nlatency_ms = 60\n\n[[device]]\nname = "laptop"\nrank = 16\n'
    )
    (tmp_path / "run.toml").write_text(
        'method = "fedlora"\n[model]\nname = "tiny-bert"\n'
        '[federated]\nclients = 5\nfleet = "fleet.toml"\n'
    )
    cfg = resolve(load_config(tmp_path / "run.toml"))
    fed = cfg.federated
    assert fed.fleet is None and [d.name for d in fed.devices] == ["phone", "laptop"]
    assert (fed.devices[0].up_mbps, fed.devices[0].latency_ms) == (2, 60)
    assert device_ranks(cfg) == [4, 16, 4, 16, 4]
    assert cfg.model.lora is not None and cfg.model.lora.r == 16
    again = resolve(build_config(tomllib.loads(to_toml(cfg))))  # what clients receive
    assert (again.federated, again.model) == (cfg.federated, cfg.model)
    # an empty fleet drops the file the config names (e.g. for ranks given inline)
    inline = load_config(
        tmp_path / "run.toml", ['federated.fleet=""', "federated.client_ranks=[2]"]
    )
    assert inline.federated.devices == [] and inline.federated.client_ranks == [2]


BAD_FLEETS = [
    ({"client_ranks": [0, 4]}, {}, "client_ranks"),
    ({"client_ranks": [-2]}, {}, "client_ranks"),
    ({"client_ranks": [2, 4, 8, 16]}, {}, "lists 4 entries but federated.clients = 3"),
    ({"client_ranks": []}, {}, "client_ranks"),
    ({"client_ranks": [2, 8]}, {"model": {"lora": {"r": 4}}}, "model.lora.r = 4"),
    ({"client_ranks": [2, 8]}, {"method": "fedavg"}, "'fedlora'"),
    ({"client_ranks": [2, 8]}, {"method": "fedkd"}, "'fedlora'"),
    ({"client_ranks": [2], "devices": [{"rank": 4}]}, {}, "not both"),
    ({"devices": [{"rank": 4}, {"memory_mib": 100}]}, {}, "have no rank"),
    ({"devices": [{"rank": 4, "bandwidth": 3}]}, {}, "bandwidth"),
]


@pytest.mark.parametrize(("fed", "other", "needle"), BAD_FLEETS)
def test_bad_fleets_are_config_errors(fed: dict, other: dict, needle: str) -> None:
    raw: dict = {"method": "fedlora", "model": {"name": "tiny-bert"},
                 "federated": {"clients": 3, **fed}, **other}  # fmt: skip
    raw["model"] = {"name": "tiny-bert", **other.get("model", {})}
    with pytest.raises(ConfigError, match=needle):
        resolve(build_config(raw))


def test_bad_fleet_files_are_config_errors(tmp_path: Path) -> None:
    def load(text: str | None) -> None:
        fleet = tmp_path / "fleet.toml"
        fleet.unlink(missing_ok=True)
        if text is not None:
            fleet.write_text(text)
        build_config({"method": "fedlora", "federated": {"fleet": str(fleet)}})

    with pytest.raises(ConfigError, match="does not exist"):
        load(None)
    with pytest.raises(ConfigError, match=r"\[\[device\]\]"):
        load("rank = 4\n")
    with pytest.raises(ConfigError, match="device 1: rank"):
        load("[[device]]\nrank = 4\n[[device]]\nrank = 0\n")
    with pytest.raises(ConfigError, match="valid keys"):
        load("[[device]]\nrnak = 4\n")


@pytest.mark.parametrize("ranks", ["[0,4]", "[2,4,8,16,32]"])
def test_cli_refuses_a_bad_fleet_with_exit_2(ranks: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = write_sst2(tmp_path)
    code = main(["run", "--set", "method=fedlora", "--set", "model.name=tiny-bert",
                 "--set", "task.name=glue/sst2", "--set", f"task.data_dir={json.dumps(str(data))}",
                 "--set", "federated.clients=4", "--set", f"federated.client_ranks={ranks}",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cotune: error:") and "client_ranks" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "summary.json").exists()


# ------------------------------------------------------------------------- a real run


def lora_numbers_per_rank(state: dict[str, np.ndarray]) -> int:
    """LoRA numbers one rank component adds (over every A row and B column)."""
    return sum(v.size // v.shape[axis] for k, v in state.items()
               if (axis := rank_axis(k)) is not None)  # fmt: skip


def test_tiny_bert_fleet_of_ranks_2_4_8(tmp_path: Path) -> None:
    cfg = tiny_config(
        write_sst2(tmp_path),
        federated={"clients": 3, "rounds": 2, "local_steps": 2, "client_ranks": [2, 4, 8]},
    )
    result = run_federated(cfg, tmp_path / "run", engine="inline")
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and "loss" in result.metrics
    rounds = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert [(r["round"], r["clients_ok"], r["clients_rejected"]) for r in rounds] == [
        (1, 3, 0),
        (2, 3, 0),
    ]
    # the global model is the rank-8 adapter, and it moved away from its initial state
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt is not None and state_rank(ckpt.global_state) == 8
    per_rank = lora_numbers_per_rank(ckpt.global_state)
    assert per_rank == 4 * 2 * (64 + 64)  # tiny-bert: 4 layers x (query, value), width 64
    # bytes: each device moves its own rank's factors, 4 bytes per number per round
    cb = result.extra["client_bytes"]
    assert sorted(cb) == ["0", "1", "2"]
    up = [cb[p]["up"] for p in ("0", "1", "2")]
    down = [cb[p]["down"] for p in ("0", "1", "2")]
    for (lo, r_lo), (hi, r_hi) in [((0, 2), (1, 4)), ((1, 4), (2, 8))]:
        expected = 2 * 4 * per_rank * (r_hi - r_lo)  # 2 rounds of float32 numbers
        assert abs((up[hi] - up[lo]) - expected) <= 64, (up, expected)
        assert down[hi] - down[lo] > expected / 2  # round 1's zero B matrices travel once
    assert sum(up) < result.bytes_up and sum(down) < result.bytes_down  # + the hand-shake


def test_a_fleet_resumed_after_round_1_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = tiny_config(
        write_sst2(tmp_path),
        federated={"clients": 3, "rounds": 2, "local_steps": 2, "client_ranks": [2, 4, 8]},
    )
    full = run_federated(cfg, tmp_path / "full", engine="inline")
    run_federated(cfg, tmp_path / "part", engine="inline", stop_after=1)
    resumed = run_federated(cfg, tmp_path / "part", engine="inline", resume=True)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a is not None and b is not None and a.round == b.round == 2
    for name in a.global_state:
        assert np.array_equal(a.global_state[name], b.global_state[name]), name
    assert resumed.metrics == full.metrics
    # per-device bytes carry on across the restart (node ids, random per launch, are in
    # every message head: their encoded size may differ by a byte or two)
    for part, sizes in full.extra["client_bytes"].items():
        for way in ("down", "up"):
            assert abs(resumed.extra["client_bytes"][part][way] - sizes[way]) <= 16
