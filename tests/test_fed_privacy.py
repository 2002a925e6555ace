"""Differential privacy of federated rounds (Flower's fixed-clipping wrappers, the noise
set by Opacus's accountant) and SecAgg+ (Flower's workflow and mod): the noise the
server adds is the accountant's, every averaged update is within the clip, an
unchanged update does not crash the clipping, the SecAgg+ server only ever holds
masked vectors and their sum (which is plain FedAvg's up to the quantisation), a
client dropping mid-round is survived, and bad settings exit 2 with a clear message.
Tiny randomly initialised models on the inline engine (one slow test on Flower's
simulation engine)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from helpers import tiny_config, tiny_fedlora_run_args, write_sst2
from opacus.accountants.utils import get_noise_multiplier
from safetensors.numpy import load_file

from cotune.cli.main import main
from cotune.config import build_config
from cotune.methods import resolve
from cotune.privacy import RoundsBudget, epsilon_spent
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.apps import build_client_app
from cotune.runtime.federated.client_mods import update_norm
from cotune.runtime.federated.engine import run_federated
from cotune.runtime.federated.grid import CountingGrid
from cotune.runtime.federated.records import to_arrays
from cotune.runtime.federated.strategy import CotuneFedAvg

EPS, DELTA = 4.0, 1e-5


def _dp_config(data: Path, mode: str, clip: float = 0.01, **federated: object):
    fed = {"clients": 4, "fraction": 0.5, "rounds": 2, **federated}
    return tiny_config(
        data,
        federated=fed,
        privacy={"epsilon": EPS, "delta": DELTA, "clip": clip, "federated": mode},
    )


def _spy_noise(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The std of every noise draw Flower's DP wrapper makes (the draw still happens)."""
    import flwr.serverapp.strategy.dp_fixed_clipping as flower_dp

    stds: list[float] = []
    real = flower_dp.add_gaussian_noise_inplace

    def spy(arrays, std):  # type: ignore[no-untyped-def]
        stds.append(float(std))
        real(arrays, std)

    monkeypatch.setattr(flower_dp, "add_gaussian_noise_inplace", spy)
    return stds


def _spy_averaged_norms(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The L2 norm of every update as cotune's FedAvg averages it (after clipping)."""
    norms: list[float] = []
    real = CotuneFedAvg.aggregate_train

    def spy(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        sent = to_arrays(self.global_state)
        norms.extend(update_norm(sent, m.content.array_records["arrays"]) for m in replies)
        return real(self, server_round, replies)

    monkeypatch.setattr(CotuneFedAvg, "aggregate_train", spy)
    return norms


@pytest.mark.parametrize("mode", ["server", "client"])
def test_noise_is_the_accountants_and_every_averaged_update_is_clipped(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stds, norms = _spy_noise(monkeypatch), _spy_averaged_norms(monkeypatch)
    clip = 0.01  # well below a round's update norm here: every update is clipped
    cfg = _dp_config(write_sst2(tmp_path, n_train=80), mode, clip)
    result = run_federated(cfg, tmp_path / "run", engine="inline")

    # 4 clients, 2 sampled per round, 2 rounds: Opacus's noise multiplier for the target
    sigma = get_noise_multiplier(
        target_epsilon=EPS, target_delta=DELTA, sample_rate=0.5, steps=2,
        accountant="rdp", epsilon_tolerance=0.01,
    )  # fmt: skip
    assert stds == pytest.approx([sigma * clip / 2] * 2, rel=1e-9)
    assert len(norms) == 4
    assert all(n <= clip * (1 + 1e-5) for n in norms), norms
    assert min(norms) > clip * 0.99  # clipped to the bound, not merely below it

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    spent = [r["epsilon"] for r in rows]
    assert spent == pytest.approx([epsilon_spent(sigma, DELTA, 0.5, k) for k in (1, 2)])
    assert 0 < spent[0] < spent[1] <= EPS * 1.01
    assert all(r["clients_ok"] == 2 for r in rows)
    privacy = result.extra["privacy"]
    assert privacy["clipping"] == mode and privacy["noise_multiplier"] == pytest.approx(sigma)
    assert privacy["noise_std"] == pytest.approx(sigma * clip / 2)
    assert privacy["epsilon"] == pytest.approx(spent[-1])
    # and the final metrics say it too (as a split run's do: `cotune compare` shows it)
    assert result.metrics["epsilon"] == pytest.approx(spent[-1])


def test_rounds_budget_matches_flowers_noise_formula() -> None:
    from flwr.supercore.differential_privacy import compute_stdv

    budget = RoundsBudget.plan(2.0, 1e-6, 0.7, clients=100, sampled=10, rounds=20)
    assert budget.noise_std == pytest.approx(compute_stdv(budget.sigma, 0.7, 10))
    assert budget.spent(20) <= 2.0 * 1.01 and budget.spent(10) < budget.spent(20)


def _unchanged(message: Message, context, call_next):  # type: ignore[no-untyped-def]
    """A client whose update is zero: it sends back exactly what it received."""
    reply = call_next(message, context)
    if message.metadata.message_type == MessageType.TRAIN and not reply.has_error():
        sent = message.content.array_records["arrays"]
        reply.content.array_records["arrays"] = ArrayRecord(
            {k: Array(v.numpy().copy()) for k, v in sent.items()}
        )
    return reply


@pytest.mark.parametrize("mode", ["server", "client"])
def test_an_unchanged_update_does_not_crash_the_clipping(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stds = _spy_noise(monkeypatch)
    cfg = _dp_config(write_sst2(tmp_path, n_train=80), mode, clip=0.5, rounds=1, fraction=1.0)
    app = build_client_app([_unchanged])  # innermost: the DP mod sees the zero update
    run_federated(cfg, tmp_path / "run", client_app=app, engine="inline")
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert row["clients_ok"] == 4 and row["clients_failed"] == 0
    assert len(stds) == 1  # the average of the zero updates was still noised


@pytest.mark.parametrize("method", ["fedavg", "fedkd"])
def test_server_side_dp_runs_with_fedavg_and_fedkd(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stds = _spy_noise(monkeypatch)
    kd = {"kd": {"teacher": "tiny-roberta", "server_steps": 2}} if method == "fedkd" else {}
    cfg = tiny_config(
        write_sst2(tmp_path, n_train=64),
        method=method,
        federated={"clients": 4, "rounds": 1},
        privacy={"epsilon": EPS, "delta": DELTA, "clip": 0.5, "federated": "server"},
        **kd,
    )
    result = run_federated(cfg, tmp_path / "run", engine="inline")
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert row["clients_ok"] == 4 and row["epsilon"] == pytest.approx(EPS, rel=0.01)
    # fraction 1: no sampling amplification, sigma from the accountant at rate 1
    sigma = get_noise_multiplier(
        target_epsilon=EPS, target_delta=DELTA, sample_rate=1.0, steps=1,
        accountant="rdp", epsilon_tolerance=0.01,
    )  # fmt: skip
    assert stds == pytest.approx([sigma * 0.5 / 4])
    assert result.extra["privacy"]["noise_std"] == pytest.approx(stds[0])


def test_noise_comes_from_its_own_generator_not_the_runs_seed(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=64)

    def final(name: str, **privacy: object) -> dict[str, np.ndarray]:
        cfg = tiny_config(
            data,
            federated={"clients": 4, "rounds": 1},
            privacy={"epsilon": EPS, "clip": 0.5, "federated": "server", **privacy},
        )
        run_federated(cfg, tmp_path / name, engine="inline")
        return _final(tmp_path / name)

    seeded, again = final("a", noise_seed=7), final("b", noise_seed=7)
    fresh, fresh_again = final("c"), final("d")
    for name in seeded:  # same noise seed: the same run; no noise seed: OS entropy
        np.testing.assert_array_equal(seeded[name], again[name])
    assert any(not np.array_equal(fresh[n], fresh_again[n]) for n in fresh)
    assert any(not np.array_equal(fresh[n], seeded[n]) for n in fresh)


# ------------------------------------------------------------------------------ SecAgg+


def _spy_uploads(monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """Every message the server receives (through the counting grid)."""
    received: list[Message] = []
    real = CountingGrid.send_and_receive

    def spy(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = real(self, messages, timeout=timeout)
        received.extend(replies)
        return replies

    monkeypatch.setattr(CountingGrid, "send_and_receive", spy)
    return received


UPDATES: dict[int, list[np.ndarray]] = {}  # partition -> its update, as the client made it


def _record_update(message: Message, context, call_next):  # type: ignore[no-untyped-def]
    reply = call_next(message, context)
    if message.metadata.message_type == MessageType.TRAIN and not reply.has_error():
        sent = message.content.array_records["arrays"]
        trained = reply.content.array_records["arrays"]
        part = int(context.node_config["partition-id"])
        UPDATES[part] = [trained[k].numpy() - v.numpy() for k, v in sent.items()]
    return reply


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "trainable.safetensors"))


def _secagg_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **federated: object):
    """The same config run as plain FedAvg and with SecAgg+ (the uploads of the
    SecAgg+ run recorded); their run folders and the SecAgg+ uploads."""
    data = write_sst2(tmp_path, n_train=80)
    fed = {"clients": 4, "rounds": 1, **federated}
    plain = tiny_config(data, federated=fed)
    run_federated(plain, tmp_path / "plain", engine="inline")
    received = _spy_uploads(monkeypatch)
    UPDATES.clear()
    secure = tiny_config(data, federated={**fed, "secagg": True})
    run_federated(
        secure, tmp_path / "secagg", client_app=build_client_app([_record_update]), engine="inline"
    )
    return tmp_path / "plain", tmp_path / "secagg", received


def test_secagg_server_holds_only_masked_vectors_and_their_sum_is_fedavgs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, secure, received = _secagg_pair(tmp_path, monkeypatch)
    assert sorted(UPDATES) == [0, 1, 2, 3]

    masked_values = update_values = 0
    for msg in received:
        if msg.has_error():
            continue
        # no model arrays ever reach the server: the fit results' arrays are emptied
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())
        config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is None or Key.MASKED_PARAMETERS not in config:
            continue
        masked = [bytes_to_ndarray(b) for b in config[Key.MASKED_PARAMETERS]]
        # the first entry is the weight factor, the rest one array per tensor
        vectors = masked[1:]
        assert [v.shape for v in vectors] == [u.shape for u in UPDATES[0]]
        flat = np.concatenate([v.ravel() for v in vectors]).astype(np.float64)
        # masked with uniform draws mod 2^32: spread over the whole field, unlike a
        # quantised update (within 2^22 x the weight factor)
        assert flat.min() >= 0 and np.median(flat) > 2**28
        for update in UPDATES.values():
            assert not any(
                np.allclose(v, u, atol=1e-3) for v, u in zip(vectors, update, strict=True)
            )
        masked_values += sum(v.size for v in vectors)
        update_values += sum(u.size for u in UPDATES[0])
        assert all(v.dtype == np.int64 for v in vectors)  # 8 bytes a value, vs 4 in fp32
    assert masked_values == update_values == 4 * sum(u.size for u in UPDATES[0])

    a, b = _final(plain), _final(secure)
    assert sorted(a) == sorted(b)
    for name in a:  # quantisation: 16 / 2^22 per value, scaled by the weights
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-4, err_msg=name)
    (p,) = read_jsonl(plain / "metrics.jsonl")
    (s,) = read_jsonl(secure / "metrics.jsonl")
    assert s["clients_ok"] == 4
    # the key exchange, shares, masked vectors and unmasking are all counted
    assert s["round_bytes_up"] > p["round_bytes_up"]
    assert s["round_bytes_down"] > p["round_bytes_down"]
    summary = json.loads((secure / "federated_result.json").read_text())
    assert summary["secure_aggregation"]["threshold"] == 3


def test_secagg_survives_a_client_dropping_mid_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one of 4 clients (seeded) raises when asked for its masked vector, after the key
    # exchange: its masks are rebuilt from the others' shares (threshold 3)
    faults = {"fail_fraction": 0.25, "mode": "raise", "seed": 1}
    plain, secure, _ = _secagg_pair(tmp_path, monkeypatch, faults=faults)
    (p,) = read_jsonl(plain / "metrics.jsonl")
    (s,) = read_jsonl(secure / "metrics.jsonl")
    assert p["clients_ok"] == s["clients_ok"] == 3
    assert s["clients_failed"] == 1
    a, b = _final(plain), _final(secure)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-4, err_msg=name)


DROPPED: list[int] = []


def _drop_at_unmask(message: Message, context, call_next):  # type: ignore[no-untyped-def]
    """Partition 0 goes away after sending its masked vector (at the unmask stage)."""
    config = message.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = None if config is None else config.get(Key.STAGE)
    if stage == Stage.UNMASK and int(context.node_config["partition-id"]) == 0:
        DROPPED.append(0)
        raise RuntimeError("gone before unmasking")
    return call_next(message, context)


def test_secagg_keeps_the_update_of_a_client_gone_before_unmasking(tmp_path: Path) -> None:
    # its masked vector is in the sum; the others' shares of its private mask seed
    # remove that mask, so its update counts and the sum is plain FedAvg's over all 4
    data = write_sst2(tmp_path, n_train=80)
    fed = {"clients": 4, "rounds": 1}
    run_federated(tiny_config(data, federated=fed), tmp_path / "plain", engine="inline")
    secure = tiny_config(data, federated={**fed, "secagg": True})
    app = build_client_app(outer=[_drop_at_unmask])
    DROPPED.clear()
    run_federated(secure, tmp_path / "secagg", client_app=app, engine="inline")
    assert DROPPED == [0]
    (row,) = read_jsonl(tmp_path / "secagg" / "metrics.jsonl")
    assert row["clients_ok"] == 4
    a, b = _final(tmp_path / "plain"), _final(tmp_path / "secagg")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-4, err_msg=name)


# ----------------------------------------------------------------------- bad settings


def _fed_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--set", "method=fedlora",
        "--set", "task.name=glue/sst2",
        "--set", f"task.data_dir={json.dumps(str(data))}",
        "--set", "model.name=tiny-bert",
        "--set", "federated.clients=4",
        "--set", "federated.rounds=1",
        "--set", "federated.local_steps=1",
        "--set", "runtime.engine=inline",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


DP = ("--set", "privacy.federated=server", "--set", "privacy.epsilon=4.0")
SECAGG = ("--set", "federated.secagg=true")


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ((*DP, "--set", "privacy.epsilon=0"), ["privacy.epsilon"]),
        ((*DP, "--set", "privacy.epsilon=inf"), ["privacy.epsilon", "finite"]),
        ((*DP, "--set", "privacy.delta=1"), ["privacy.delta"]),
        ((*DP, "--set", "privacy.clip=nan"), ["privacy.clip", "finite"]),
        (("--set", "privacy.epsilon=4.0"), ["privacy.federated", "'server'", "'client'"]),
        (("--set", "privacy.federated=client"), ["privacy.epsilon"]),
        ((*DP, "--set", "method=fedpft"), ["'fedpft'", "fedavg, fedkd, fedlora"]),
        ((*DP, "--set", "method=split"), ["'split'", "fedavg, fedkd, fedlora"]),
        ((*DP, *SECAGG), ["privacy.federated together with federated.secagg"]),
        # 3 clients a round, a threshold of 3: one dropping would stop the round
        ((*SECAGG, "--set", "federated.fraction=0.75", "--set", "federated.secagg_threshold=3"),
         ["secagg_threshold = 3", "samples 3 client", "2..2"]),
        ((*SECAGG, "--set", "federated.fraction=0.5"), ["at least 3 clients", "2 client"]),
        ((*SECAGG, "--set", "federated.secagg_threshold=4"), ["secagg_threshold = 4"]),
        ((*SECAGG, "--set", "federated.secagg_shares=5"), ["secagg_shares = 5"]),
        ((*SECAGG, "--set", "federated.secagg_shares=2"), ["secagg_shares = 2", "3..4"]),
        ((*SECAGG, "--set", "federated.secagg_threshold=1"), ["secagg_threshold = 1"]),
        ((*SECAGG, "--set", "federated.secagg_shares=3", "--set", "federated.secagg_threshold=3"),
         ["secagg_threshold = 3", "2..2"]),
        ((*SECAGG, "--set", "method=splitfed", "--set", "federated.secagg_threshold=9"),
         ["'splitfed'"]),
        # the method is checked first: the message names it, not the round's size
        ((*SECAGG, "--set", "method=fedkd", "--set", "federated.clients=2"), ["'fedkd'"]),
        ((*SECAGG, "--set", "method=splitfed"), ["'splitfed'", "fedavg, fedlora"]),
        ((*SECAGG, "--set", "method=fedpft"), ["'fedpft'", "fedavg, fedlora"]),
    ],
)  # fmt: skip
def test_bad_settings_exit_2_with_a_clear_message(
    extra: tuple[str, ...], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_fed_args(tmp_path / "data", tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("method", ["fedavg", "fedlora", "fedkd"])
def test_privacy_section_is_read_by_the_federated_methods(method: str, tmp_path: Path) -> None:
    data = {
        "method": method,
        "task": {"name": "glue/sst2", "data_dir": str(tmp_path)},
        "model": {"name": "tiny-bert"},
        "privacy": {"epsilon": 8.0, "federated": "client"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "[privacy] is not read ... ignored" would raise
        cfg = resolve(build_config(data))
    assert cfg.privacy.federated == "client"


# ----------------------------------------------------------------------- simulation


@pytest.mark.slow
def test_client_dp_and_secagg_on_flowers_simulation_engine(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=80)
    dp = _dp_config(data, "client", clip=0.5, rounds=2)
    result = run_federated(dp, tmp_path / "dp", engine="simulation")
    rows = read_jsonl(tmp_path / "dp" / "metrics.jsonl")
    assert [r["clients_ok"] for r in rows] == [2, 2]
    assert rows[-1]["epsilon"] == pytest.approx(result.extra["privacy"]["epsilon"])
    assert rows[-1]["epsilon"] <= EPS * 1.01

    secure = tiny_config(data, federated={"clients": 4, "rounds": 1, "secagg": True})
    run_federated(secure, tmp_path / "secagg", engine="simulation")
    (row,) = read_jsonl(tmp_path / "secagg" / "metrics.jsonl")
    assert row["clients_ok"] == 4
    plain = tiny_config(data, federated={"clients": 4, "rounds": 1})
    run_federated(plain, tmp_path / "plain", engine="inline")
    a, b = _final(tmp_path / "plain"), _final(tmp_path / "secagg")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_secagg_on_a_loopback_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_fedlora_run_args(tmp_path, run_dir, "federated.clients=3", "federated.rounds=1",
                                 "federated.round_timeout=300", "federated.secagg=true",
                                 "runtime.engine=deployment")  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    (row,) = read_jsonl(run_dir / "metrics.jsonl")
    assert row["clients_ok"] == 3 and row["clients_failed"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secure_aggregation"] == {
        "sampled": 3, "shares": 3, "threshold": 2, "clip_range": 8.0,
        "max_weight": summary["secure_aggregation"]["max_weight"],
    }  # fmt: skip
