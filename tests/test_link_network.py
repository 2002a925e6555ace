"""Emulated networks (`[link.network]`): the clock's time for known messages is the closed
form; throttling really takes N*8/B seconds for N bytes at B Mbit/s on both transports;
profiles and overrides resolve as documented; every message a transport counts is
charged once; bad input names the valid values and exits 2."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
from helpers import TOKEN, batch_for, inprocess_pair, make_device, tiny_cfg

from cotune.cli.main import main
from cotune.config import NETWORK_PROFILES, DeviceProfile, NetworkConfig, build_config
from cotune.errors import ConfigError
from cotune.link.accounting import GRPC_PREFIX_BYTES
from cotune.link.auth import TokenBook
from cotune.link.emulation import EmulatedLink
from cotune.link.grpc_transport import GrpcTransport
from cotune.link.network import (
    MSS_BYTES,
    PROFILES,
    NetworkClock,
    NetworkSpec,
    exchange_s,
    network_spec,
    transfer_s,
)
from cotune.link.pacing import Pacer, TokenBucket
from cotune.runtime.federated.network import FleetNetwork
from cotune.runtime.split.serve import CloudServer

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the clock


def test_clock_of_a_known_sequence_is_the_closed_form() -> None:
    spec = NetworkSpec(up_mbps=8, down_mbps=16, latency_ms=10)
    clock = NetworkClock(spec)
    sequence = [("up", 1_000), ("down", 200), ("up", 50_000), ("down", 100_000)]
    for direction, n in sequence:
        clock.charge(direction, n, "train")
    # 8 Mbit/s = 1e6 bytes/s up, 2e6 bytes/s down; 10 ms per message
    expected_up = 1_000 / 1e6 + 50_000 / 1e6 + 2 * 0.010
    expected_down = 200 / 2e6 + 100_000 / 2e6 + 2 * 0.010
    snap = clock.snapshot()
    assert snap["network_up_s"] == pytest.approx(expected_up, rel=1e-12)
    assert snap["network_down_s"] == pytest.approx(expected_down, rel=1e-12)
    assert snap["network_s"] == pytest.approx(0.1411, rel=1e-12)
    assert snap["network_s_by_phase"] == {"train": pytest.approx(0.1411, rel=1e-12)}
    assert snap["messages"] == 4


def test_loss_adds_the_stated_retransmission_time() -> None:
    p, latency = 0.02, 0.05
    spec = NetworkSpec(up_mbps=8, down_mbps=8, latency_ms=latency * 1000, loss=p)
    n = 10 * MSS_BYTES  # 10 segments
    s = n / 1e6
    expected = s + latency + s * p / (1 - p) + (1 - (1 - p) ** 10) * 2 * latency
    assert transfer_s(spec, "up", n) == pytest.approx(expected, rel=1e-12)
    lossless = NetworkSpec(up_mbps=8, down_mbps=8, latency_ms=latency * 1000)
    assert transfer_s(spec, "up", n) > transfer_s(lossless, "up", n) + 0.01


def test_pacer_draws_average_to_the_clock() -> None:
    """Throttle's random jitter and loss are, on average, what the clock charges."""
    spec = NetworkSpec(up_mbps=4, down_mbps=4, latency_ms=20, jitter_ms=10, loss=0.05)
    now = [0.0]
    pacer = Pacer(spec, seed=3, now=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    n, trials = 20 * MSS_BYTES, 4000
    for _ in range(trials):
        pacer.pace("up", n)
        now[0] += 10.0  # idle in between: each message starts with a full bucket
    burst_credit = pacer.buckets["up"].burst / spec.rate_bytes_per_s("up")
    assert pacer.slept_s / trials == pytest.approx(
        transfer_s(spec, "up", n) - burst_credit, rel=0.03
    )


def test_token_bucket_waits_bytes_over_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(
        1000.0, burst=100, now=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    assert bucket.take(100) == 0.0  # the burst passes at once
    assert bucket.take(500) == pytest.approx(0.5)  # then at the rate
    assert bucket.take(250) == pytest.approx(0.25)
    now[0] += 10.0  # an idle link banks one burst, no more
    assert bucket.take(300) == pytest.approx(0.2)


# ----------------------------------------------------------------------------- profiles


def test_profiles_and_overrides() -> None:
    assert set(PROFILES) == set(NETWORK_PROFILES)
    lte = network_spec(NetworkConfig(profile="lte"))
    assert lte == PROFILES["lte"].__class__(**{**PROFILES["lte"].as_dict(), "profile": "lte"})
    faster = network_spec(NetworkConfig(profile="lte", up_mbps=20, mode="throttle"))
    assert (faster.up_mbps, faster.down_mbps, faster.latency_ms) == (
        20,
        lte.down_mbps,
        lte.latency_ms,
    )
    assert faster.mode == "throttle"
    bare = network_spec(NetworkConfig(up_mbps=5, down_mbps=7))
    assert (bare.latency_ms, bare.jitter_ms, bare.loss) == (0, 0, 0)
    with pytest.raises(ConfigError, match="jitter_ms"):
        network_spec(NetworkConfig(profile="wifi", latency_ms=0))


def test_network_section_from_toml_keys() -> None:
    cfg = tiny_cfg(link={"network": {"profile": "wifi", "down_mbps": 300}})
    assert cfg.link.network is not None and cfg.link.network.down_mbps == 300
    with pytest.raises(Exception, match="datacenter, wifi, lte, constrained"):
        tiny_cfg(link={"network": {"profile": "5g"}})
    with pytest.raises(Exception, match="up_mbps and down_mbps"):
        build_config({"method": "split", "link": {"network": {"up_mbps": 3}}})


BAD_NETWORK = [
    (
        'link.network.profile="5g"',
        ["unknown network profile '5g'", "datacenter", "wifi", "lte", "constrained"],
    ),
    ("link.network.up_mbps=-5", ["link.network.up_mbps", "positive", "-5"]),
    ('link.network.mode="sleep"', ["link.network.mode", "'clock'", "'throttle'"]),
    ("link.network.latency_ms=2", ["jitter_ms (5) exceeds latency_ms (2)", "jitter_ms <="]),
]


@pytest.mark.parametrize(("assignment", "needles"), BAD_NETWORK)
def test_bad_network_exits_2_naming_valid_values(assignment, needles, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["run", "--set", "method=split", "--set", "model.name=tiny-bert",
                 "--set", "link.network.profile=\"lte\"", "--set", assignment,
                 "--set", "train.steps=1", "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cotune: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "r" / "summary.json").exists()


# ----------------------------------------------------------------------------- transports


def _exchange(device, batch, steps: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(steps):
        device.train_step(batch)


def test_every_counted_message_is_charged_once_on_the_clock() -> None:
    cfg = tiny_cfg("bert")
    wire: list[tuple[str, bytes]] = []
    device, _, _ = inprocess_pair(cfg, tap=lambda d, b: wire.append((d, b)))
    # 2 s one way: 6 messages are >= 12 s on the clock, far beyond what 3 tiny steps take
    spec = NetworkSpec(up_mbps=3, down_mbps=5, latency_ms=2000, loss=0.01)
    link = EmulatedLink(spec)
    device.transport.network = link
    wire.clear()
    t0 = time.perf_counter()
    _exchange(device, batch_for("bert"), 3)
    elapsed = time.perf_counter() - t0
    expected = sum(transfer_s(spec, d, len(b) + GRPC_PREFIX_BYTES) for d, b in wire)
    assert len(wire) == 6 and link.clock.messages == 6
    assert link.clock.seconds == pytest.approx(expected, rel=1e-12)
    assert link.clock.snapshot()["network_s_by_phase"].keys() == {"train"}
    assert link.slept_s == 0.0 and link.offset_s() == link.clock.seconds
    assert expected > 12.0 and elapsed < expected / 2  # the clock does not sleep


def _throttled_seconds(
    device, batch, link: EmulatedLink, steps: int
) -> tuple[float, float, int, int]:  # type: ignore[no-untyped-def]
    """(measured seconds with pacing, without, bytes up, bytes down) of `steps` steps."""
    meter = device.transport.meter
    device.transport.network = None
    _exchange(device, batch, 1)  # warm
    t0 = time.perf_counter()
    _exchange(device, batch, steps)
    bare = time.perf_counter() - t0
    up0, down0 = meter.up, meter.down
    device.transport.network = link
    t0 = time.perf_counter()
    _exchange(device, batch, steps)
    paced = time.perf_counter() - t0
    return paced, bare, meter.up - up0, meter.down - down0


def _check_rate(paced: float, bare: float, up: int, down: int, spec: NetworkSpec) -> None:
    expected = up * 8 / (spec.up_mbps * 1e6) + down * 8 / (spec.down_mbps * 1e6)
    assert expected > 0.5  # the network dominates, so 10% is a real bound
    assert paced - bare == pytest.approx(expected, rel=0.10)


# Rates low enough that a few tiny-model steps (a few kB each way) take about a second;
# no latency: the time is the bytes over the rate alone. Burst: one small frame.
RATE_SPEC = NetworkSpec(up_mbps=0.1, down_mbps=0.2, mode="throttle")


def test_throttle_in_process_takes_bytes_over_rate() -> None:
    device, _, _ = inprocess_pair(tiny_cfg("bert"))
    link = EmulatedLink(RATE_SPEC)
    link.pacer = Pacer(RATE_SPEC, burst=256)
    paced, bare, up, down = _throttled_seconds(device, batch_for("bert", length=16), link, 4)
    _check_rate(paced, bare, up, down, RATE_SPEC)
    assert link.slept_s == pytest.approx(paced - bare, rel=0.10)
    # what was slept is what the clock charged: projected time = measured time
    assert abs(link.offset_s()) < 0.1 * link.clock.seconds


def test_throttle_over_grpc_takes_bytes_over_rate() -> None:
    cfg = tiny_cfg("bert")
    server = CloudServer(cfg, "127.0.0.1:0", TokenBook({0: TOKEN}))
    try:
        transport = GrpcTransport(server.address, 0, TOKEN)
        device = make_device(cfg, transport)
        device.connect(20)
        link = EmulatedLink(RATE_SPEC)
        link.pacer = Pacer(RATE_SPEC, burst=256)
        paced, bare, up, down = _throttled_seconds(device, batch_for("bert", length=16), link, 4)
        _check_rate(paced, bare, up, down, RATE_SPEC)
        transport.close()
    finally:
        server.stop()


# ----------------------------------------------------------------------------- run folders


def test_split_run_reports_projected_wall(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from helpers import write_sst2

    data = write_sst2(tmp_path, n_train=24, n_dev=8)
    out = tmp_path / "run"
    code = main(["run", "--set", "method=split", "--set", "model.name=tiny-bert",
                 "--set", "task.name=glue/sst2", "--set", f"task.data_dir={json.dumps(str(data))}",
                 "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "train.eval_every=2",
                 "--set", "link.network.profile=\"constrained\"", "--set", "runtime.export=false",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    net = summary["network"]
    assert net["profile"] == "constrained" and net["mode"] == "clock" and net["slept_s"] == 0
    # constrained: 100 ms one way, so each of the >= 2 messages per step costs >= 0.1 s
    assert net["network_s"] > 0.1 * 2 * 4
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["projected_wall_s"] > r["wall_s"] + 0.1
    assert rows[-1]["projected_wall_s"] - rows[-1]["wall_s"] == pytest.approx(net["network_s"])
    assert summary["projected_wall_s"] == pytest.approx(summary["wall_s"] + net["network_s"])
    assert summary["wall_s"] < summary["projected_wall_s"]


def test_centralized_run_projects_its_own_wall(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from helpers import write_sst2

    data = write_sst2(tmp_path, n_train=16, n_dev=8)
    out = tmp_path / "run"
    code = main(["run", "--set", "model.name=tiny-bert", "--set", "task.name=glue/sst2",
                 "--set", f"task.data_dir={json.dumps(str(data))}", "--set", "train.steps=2",
                 "--set", "train.batch_size=4", "--set", "runtime.export=false",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert all(r["projected_wall_s"] == r["wall_s"] for r in rows)
    assert summary["projected_wall_s"] == summary["wall_s"]


# ----------------------------------------------------------------------------- federated


def test_federated_call_waits_for_its_slowest_client() -> None:
    base = NetworkSpec(up_mbps=8, down_mbps=16, latency_ms=10)
    fleet = FleetNetwork(base, [{"up_mbps": None, "down_mbps": None, "latency_ms": None},
                                {"up_mbps": 1.0, "down_mbps": None, "latency_ms": 50.0}])  # fmt: skip
    down = {101: [400_000], 102: [400_000]}
    up = {101: [200_000], 102: [200_000]}
    part_of = {101: 0, 102: 1}
    t = fleet.charge(down, up, part_of)
    fast = 400_000 / 2e6 + 0.010 + 200_000 / 1e6 + 0.010
    slow = 400_000 / 2e6 + 0.050 + 200_000 / 125_000 + 0.050
    assert t == pytest.approx(max(fast, slow)) and t == pytest.approx(slow)
    # partition 2 is device 0 again (devices cycle over the clients)
    assert fleet.spec_for(2) == base
    t2 = fleet.charge({7: [1000, 1000]}, {7: [10]}, {7: 2})
    assert t2 == pytest.approx(2 * (1000 / 2e6 + 0.010) + 10 / 1e6 + 0.010)
    assert fleet.seconds == pytest.approx(t + t2) and fleet.calls == 2


def test_a_device_named_profile_replaces_the_network_and_its_own_figures_win() -> None:
    base = NetworkSpec(up_mbps=8, down_mbps=16, latency_ms=10, mode="clock", profile="wifi")
    devices = [DeviceProfile(network="constrained"), DeviceProfile(network="lte", up_mbps=3.0),
               DeviceProfile()]  # fmt: skip
    fleet = FleetNetwork(base, [
        {"network": d.network, "up_mbps": d.up_mbps, "down_mbps": d.down_mbps,
         "latency_ms": d.latency_ms} for d in devices])  # fmt: skip
    assert fleet.spec_for(0) == dataclasses.replace(PROFILES["constrained"], profile="constrained")
    assert fleet.spec_for(0).loss == 0.01  # all the profile's figures, loss included
    assert fleet.spec_for(1) == dataclasses.replace(PROFILES["lte"], profile="lte", up_mbps=3.0)
    assert fleet.spec_for(2) == base and fleet.spec_for(3) == fleet.spec_for(0)
    t = fleet.charge({1: [10_000], 2: [10_000]}, {1: [5_000], 2: [5_000]}, {1: 0, 2: 1})
    slowest = exchange_s(fleet.spec_for(0), [10_000], [5_000])
    assert t == pytest.approx(slowest)
    assert slowest > exchange_s(fleet.spec_for(1), [10_000], [5_000])


def test_federated_run_projects_rounds(tmp_path: Path) -> None:
    from helpers import tiny_config, write_sst2

    from cotune.runtime.federated.engine import run_federated

    cfg = tiny_config(write_sst2(tmp_path, n_train=48, n_dev=16),
                      link={"network": {"profile": "lte"}},
                      federated={"clients": 2, "rounds": 2, "local_steps": 1})  # fmt: skip
    result = run_federated(cfg, tmp_path / "run", engine="inline")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    net = result.extra["network"]
    assert net["profile"] == "lte" and net["calls"] >= 2
    offsets = [r["projected_wall_s"] - r["wall_s"] for r in rows]
    assert 0 < offsets[0] < offsets[1] == pytest.approx(net["network_s"])
    # each round's train call: at least both ways of the LoRA update on the lte link
    per_client = max(r["round_bytes_down"] for r in rows) / 2
    assert offsets[1] - offsets[0] >= per_client * 8 / 40e6 + 2 * 0.025 - 1e-9
    assert math.isfinite(net["network_s"])
    # each round: the clients' local training, the slowest one's and all of it
    for r in rows:
        assert 0 < r["client_train_s_max"] <= r["client_train_s_total"] <= r["wall_s"]


def test_splitfed_run_waits_for_its_slowest_device_link(tmp_path: Path) -> None:
    from helpers import splitfed_config, write_e2e

    from cotune.runtime.experiment import run_experiment

    cfg = splitfed_config(write_e2e(tmp_path / "e2e", n_train=9),
                          train={"steps": 2, "batch_size": 1},
                          link={"network": {"up_mbps": 2, "down_mbps": 4, "latency_ms": 30}},
                          runtime={"export": False},
                          generation={"num_beams": 1, "max_new_tokens": 4})  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    devices = summary["network"]["devices"]
    assert len(devices) == 3
    # each device: >= 2 steps x (forward up + answer down) + adapter averaging, 30 ms each
    assert all(d["network_s"] >= 4 * 0.030 and d["slept_s"] == 0 for d in devices.values())
    slowest = max(d["offset_s"] for d in devices.values())
    assert summary["network"]["offset_s"] == pytest.approx(slowest)
    assert summary["projected_wall_s"] == pytest.approx(summary["wall_s"] + slowest)
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["projected_wall_s"] - last["wall_s"] == pytest.approx(slowest)
