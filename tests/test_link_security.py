"""Split link hardening: private token files, keyed token hashes, and a cloud that cuts
off a misbehaving device (too many streams, an oversized message, a flood, a stalled
message) without its memory growing or the other devices being refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cotune.cli.main import main
from cotune.config import build_config, to_toml
from cotune.errors import ConfigError
from cotune.link.auth import TokenBook, read_token_file, write_token_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import link_abuse as abuse  # noqa: E402

CONFIG: dict[str, Any] = {
    "name": "link-security-test",
    "method": "split",
    "task": {"name": "bbc-news"},
    "model": {"name": "tiny-bert"},
    "split": {"cut": 2},
}


def test_group_readable_token_file_is_refused_with_the_chmod_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens"
    write_token_file(tokens, [0, 1])
    read_token_file(tokens)  # 0600: fine
    tokens.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by group or others"):
        read_token_file(tokens)
    cfg = tmp_path / "split.toml"
    cfg.write_text(to_toml(build_config({**CONFIG, "runtime": {"tokens": str(tokens)}})))
    code = main(["cloud", "--config", str(cfg), "--listen", "127.0.0.1:0"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"chmod 600 {tokens}" in err and "0640" in err
    assert "Traceback" not in err
    tokens.chmod(0o604)  # others may read: refused too
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token_file(tokens)


def test_token_book_keeps_keyed_hashes_only() -> None:
    token = "s3cret-token-of-device-five"
    book = TokenBook({5: token, 6: "another-one"})
    assert book.check(5, token)
    assert not book.check(5, "another-one")  # another device's token
    assert not book.check(5, token + "x")
    assert not book.check(7, token)  # unknown device
    assert 5 in book and 7 not in book
    assert book.device_ids() == [5, 6]
    held = repr(vars(book))
    assert token not in held and token.encode().hex() not in held
    # two books of the same tokens use different keys: their digests differ
    assert TokenBook({5: token})._digests[5] != TokenBook({5: token})._digests[5]


@pytest.fixture()
def echo_cloud(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A cloud process (trivial service, the real transport and guard): 4 MB messages,
    a stream cut after 3 s without a whole message, 200 messages/s per device."""
    tokens = write_token_file(tmp_path / "tokens", [0, 1, 2, 3, 4])
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, abuse.__file__, "--echo-cloud", "--tokens", str(tmp_path / "tokens"),
         "--port-file", str(port_file), "--max-message-mb", "4", "--idle-s", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        port = abuse.wait_for_port(port_file, proc, 120)
        yield {"address": f"127.0.0.1:{port}", "tokens": tokens, "proc": proc, "port": port}
    finally:
        proc.kill()
        proc.wait(30)


def _counters(proc: subprocess.Popen[str]) -> dict[str, int]:
    time.sleep(1.5)  # the cloud prints its counters every 0.5 s
    proc.kill()
    lines = proc.communicate(timeout=30)[0].strip().splitlines()
    return dict(json.loads(lines[-1]))


def test_oversized_message_is_refused_before_the_cloud_allocates_it(
    echo_cloud: dict[str, Any],
) -> None:
    address, tokens, proc = echo_cloud["address"], echo_cloud["tokens"], echo_cloud["proc"]
    assert abuse.flood(address, 0, tokens[0], 3) == ("OK", 3)  # the cloud answers
    before = abuse.peak_rss_kb(proc.pid)
    assert abuse.send_oversized(address, 2, tokens[2], 128 << 20) == "RESOURCE_EXHAUSTED"
    grown_mb = (abuse.peak_rss_kb(proc.pid) - before) / 1024
    assert grown_mb < 32, f"the cloud's peak RSS grew by {grown_mb:.0f} MB for a 128 MB message"
    assert abuse.flood(address, 2, tokens[2], 3) == ("OK", 3)  # the device may go on


def test_many_streams_flood_and_stall_are_cut_off_while_an_honest_device_goes_on(
    echo_cloud: dict[str, Any],
) -> None:
    address, tokens = echo_cloud["address"], echo_cloud["tokens"]
    seen = abuse.attack(address, {d: tokens[d] for d in (1, 2, 3, 4)}, streams=50)
    own = seen["own_token_streams"]
    # at most 2 open at a time per device (a slot frees when an idle one is cut after 3 s)
    refused, cut = own.get("RESOURCE_EXHAUSTED", 0), own.get("CANCELLED", 0)
    assert refused + cut == 50 and refused >= 40 and cut >= 2, own
    bogus = seen["bogus_token_streams"]
    # every bogus stream is refused: by the token check, or (on a slow machine, while
    # the other attacks hold calls open) by gRPC's own cap on concurrent calls
    assert sum(bogus.values()) == 50, bogus
    assert set(bogus) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, bogus
    assert bogus.get("UNAUTHENTICATED", 0) >= 25, bogus
    assert seen["oversized"] == "RESOURCE_EXHAUSTED"
    code, answered = seen["flood"]
    assert code == "RESOURCE_EXHAUSTED" and answered < 5000
    assert seen["stall_cut_after_s"] is not None and 2.5 < seen["stall_cut_after_s"] < 10
    # an honest device is served right after, and the stalled streams were released
    assert abuse.flood(address, 0, tokens[0], 20) == ("OK", 20)
    assert abuse.flood(address, 1, tokens[1], 5) == ("OK", 5)
    counters = _counters(echo_cloud["proc"])
    # (gRPC's own cap on concurrent calls may refuse a few before the guard sees them)
    assert 30 <= counters["refused"] <= refused
    assert bogus.get("UNAUTHENTICATED", 0) <= counters["unauthenticated"] <= 50
    assert counters["stalled"] >= 3 and counters["rate_limited"] >= 1


def test_cloud_off_loopback_needs_tls_unless_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens"
    write_token_file(tokens, [0])
    cfg = tmp_path / "split.toml"
    cfg.write_text(to_toml(build_config({**CONFIG, "runtime": {"tokens": str(tokens)}})))
    code = main(["cloud", "--config", str(cfg), "--listen", "0.0.0.0:0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "runtime.tls_cert" in err and "cotune keys init" in err and "insecure" in err


def test_a_message_that_is_not_a_device_message_cuts_the_stream(
    echo_cloud: dict[str, Any],
) -> None:
    import grpc

    address, tokens = echo_cloud["address"], echo_cloud["tokens"]
    channel = grpc.insecure_channel(address)
    stub = channel.stream_stream(abuse.METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub(iter([b"\xff\xff\xff"]), metadata=abuse._metadata(0, tokens[0])):
            pass
    channel.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert abuse.flood(address, 0, tokens[0], 2) == ("OK", 2)  # the cloud goes on
