"""A malicious device against a split cloud: does an honest device keep its pace?

The cloud is a `cotune cloud` process (split, tiny-bert, bbc-news batches) on 127.0.0.1
with two devices in its token file. Device 0 is honest and takes split training steps;
device 1 is malicious and, in every attack phase, at once
- opens 50 streams with its valid token and holds them open (the cloud admits
  `runtime.max_streams_per_device`, refuses the rest),
- opens 50 streams with made-up tokens,
- sends one message of 256 MB (the limit is `runtime.max_message_mb`),
- starts a message by hand over HTTP/2, declaring 1 MB, and stalls after 1 kB (the
  cloud cuts the stream after `runtime.stream_idle_s`),
- floods tiny messages (the cloud cuts it at `runtime.max_messages_per_s`).

Phases alternate (quiet, attack, quiet, attack, ...) so that load drift on a shared
machine hits both alike; the attacker runs in its own process at a lower priority
(`nice 19`), standing in for a device on its own hardware. Every honest step taken
while the attacker runs its round (from after its imports until it exits, ~10 s: the
stall is cut after `stream_idle_s`) is timed as an attack step. Reported: the honest device's
median step time in each kind of phase and their ratio (target <= 1.2), the cloud's
peak resident memory (VmHWM) before and after the attacks, and what the attacker saw.

    nice .venv/bin/python benchmarks/link_abuse.py [--phases 3] [--steps 20]

Writes benchmarks/results/link_abuse.json. The attack functions are also used by
tests/test_link_security.py; `--echo-cloud` serves a trivial service behind the same
guard (what the tests measure memory on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cotune.link.auth import BEARER, DEVICE_ID_KEY, TokenBook, write_token_file  # noqa: E402
from cotune.link.grpc_transport import METHOD, start_server  # noqa: E402
from cotune.link.guard import Limits, StreamGuard  # noqa: E402
from cotune.link.proto import pb  # noqa: E402
from cotune.link.service import CloudEndpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- attacks


def _metadata(device_id: int, token: str) -> list[tuple[str, str]]:
    return [(DEVICE_ID_KEY, str(device_id)), ("authorization", BEARER + token)]


def _raw_stub(channel: grpc.Channel) -> Any:
    return channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)


def _channel(address: str) -> grpc.Channel:
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    return grpc.insecure_channel(address, unlimited)


def hold_streams(address: str, device_id: int, token: str, n: int, hold_s: float) -> dict[str, int]:
    """Open `n` streams at once, each sending nothing, and keep them open up to `hold_s`
    seconds. Returns how the cloud answered them, by status code ("OPEN": still open
    when we let go)."""
    channel = _channel(address)
    stub = _raw_stub(channel)
    release = threading.Event()
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def idle() -> Iterator[bytes]:
        release.wait(hold_s)
        return
        yield b""  # a generator that sends nothing

    def one() -> None:
        call = stub(idle(), metadata=_metadata(device_id, token))
        try:
            for _ in call:
                pass
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name if not release.is_set() else "OPEN"
        with lock:
            codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline and sum(codes.values()) < n:
        time.sleep(0.05)
    release.set()
    channel.close()
    for t in threads:
        t.join(5)
    return codes


def send_oversized(address: str, device_id: int, token: str, nbytes: int) -> str:
    """Send one message of `nbytes` (zeros); returns the status code the cloud ends the
    stream with."""
    channel = _channel(address)
    try:
        call = _raw_stub(channel)(iter([bytes(nbytes)]), metadata=_metadata(device_id, token))
        for _ in call:
            pass
        return "OK"
    except grpc.RpcError as err:
        return str(err.code().name)
    finally:
        channel.close()


def flood(address: str, device_id: int, token: str, n: int) -> tuple[str, int]:
    """Send `n` tiny (valid, empty) messages as fast as possible; returns the final status
    code and how many answers came back before it."""
    channel = _channel(address)
    empty = pb.DeviceMessage().SerializeToString()
    answers = 0
    try:
        call = _raw_stub(channel)((empty for _ in range(n)), metadata=_metadata(device_id, token))
        for _ in call:
            answers += 1
        return "OK", answers
    except grpc.RpcError as err:
        return str(err.code().name), answers
    finally:
        channel.close()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing (names and values < 127 bytes)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def stall_mid_message(
    host: str, port: int, device_id: int, token: str, declared: int, sent: int, wait_s: float
) -> float | None:
    """Open a stream by hand over HTTP/2, start a message declaring `declared` bytes,
    send `sent` of them and stall. Returns after how many seconds the cloud ended the
    stream (RST_STREAM, trailers or GOAWAY), or None if it had not after `wait_s`."""
    sock = socket.create_connection((host, port), timeout=wait_s)
    try:
        headers = b"".join(
            _literal(k, v)
            for k, v in [
                (":method", "POST"), (":scheme", "http"), (":path", METHOD),
                (":authority", f"{host}:{port}"), ("content-type", "application/grpc"),
                ("te", "trailers"), (DEVICE_ID_KEY, str(device_id)),
                ("authorization", BEARER + token),
            ]
        )  # fmt: skip
        body = b"\x00" + struct.pack(">I", declared) + bytes(sent)
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(0x4, 0, 0, b"")  # SETTINGS
            + _frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + _frame(0x0, 0, 1, body)  # DATA, no END_STREAM: the message is unfinished
        )
        start = time.monotonic()
        buf = b""
        while time.monotonic() - start < wait_s:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return time.monotonic() - start  # connection closed
            buf += chunk
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                kind, flags = buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9 : 9 + length], buf[9 + length :]
                if kind == 0x4 and not flags & 0x1:
                    sock.sendall(_frame(0x4, 0x1, 0, b""))  # SETTINGS ACK
                elif kind == 0x6 and not flags & 0x1:
                    sock.sendall(_frame(0x6, 0x1, 0, payload))  # PING ACK
                elif kind == 0x3 or kind == 0x7 or (kind == 0x1 and stream == 1 and flags & 0x1):
                    return time.monotonic() - start
        return None
    finally:
        sock.close()


def attack(
    address: str, tokens: dict[int, str], streams: int = 50, stall_wait_s: float = 20.0
) -> dict[str, Any]:
    """Everything at once, by malicious devices with valid tokens: the first opens the
    streams, the next ones send the oversized message, stall, and flood."""
    (d1, t1), (d2, t2), (d3, t3), (d4, t4) = list(tokens.items())[:4]
    host, port = address.rsplit(":", 1)
    out: dict[str, Any] = {}

    def run(name: str, fn: Any, *args: Any) -> threading.Thread:
        t = threading.Thread(target=lambda: out.__setitem__(name, fn(*args)), daemon=True)
        t.start()
        return t

    threads = [
        run("own_token_streams", hold_streams, address, d1, t1, streams, 6.0),
        run("bogus_token_streams", hold_streams, address, d1, "x" * 32, streams, 6.0),
        run("oversized", send_oversized, address, d2, t2, 256 << 20),
        run("stall_cut_after_s", stall_mid_message, host, int(port), d3, t3, 1 << 20, 1024,
            stall_wait_s),
        run("flood", flood, address, d4, t4, 5000),
    ]  # fmt: skip
    for t in threads:
        t.join(30)
    return out


# ----------------------------------------------------------------------------- clouds


class _EchoSession:
    def handle(self, msg: pb.DeviceMessage) -> tuple[pb.CloudMessage, None]:
        return pb.CloudMessage(ack=pb.Ack()), None

    def close(self) -> None:
        pass


class EchoService:
    """Answers every message with an `Ack` (the guard and the transport, nothing else)."""

    def open_session(self, device_id: int) -> _EchoSession:
        return _EchoSession()


def serve_echo(tokens: str, port_file: str, max_message_mb: float, limits: Limits) -> None:
    endpoint = CloudEndpoint(EchoService(), TokenBook.load(tokens))
    guard = StreamGuard(limits)
    server, port = start_server(
        endpoint, "127.0.0.1:0", max_message_bytes=int(max_message_mb * (1 << 20)),
        guard=guard, max_workers=16,
    )  # fmt: skip
    tmp = Path(f"{port_file}.tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)
    while True:  # until killed; counters on stdout for the tests
        time.sleep(0.5)
        print(
            json.dumps({"refused": guard.refused_streams, "stalled": guard.stalled_streams,
                        "rate_limited": guard.rate_limited, "unauthenticated": endpoint.refused}),
            flush=True,
        )  # fmt: skip


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for process {pid}")


def wait_for_port(port_file: Path, proc: subprocess.Popen[Any], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the cloud exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError("the cloud did not start")
        time.sleep(0.1)
    return int(port_file.read_text())


# ----------------------------------------------------------------------------- benchmark

CONFIG: dict[str, Any] = {
    "name": "link-abuse",
    "method": "split",
    "seed": 3,
    "task": {"name": "bbc-news", "max_train_examples": 400},
    "model": {"name": "tiny-bert"},
    "train": {"steps": 10_000, "batch_size": 8, "max_seq_len": 64, "threads": 1},
    "split": {"cut": 2, "labels": "cloud"},
    "runtime": {
        "connect_timeout_s": 900, "max_message_mb": 16, "stream_idle_s": 10.0,
        "max_messages_per_s": 200,
    },
}  # fmt: skip


def _attacker(address: str, tokens: str, out: str, niceness: int) -> None:
    """One attack round, from the "go" line on stdin (after the imports)."""
    os.nice(niceness)
    book = {int(k): v for k, v in json.loads(tokens).items()}
    print("ready", flush=True)
    sys.stdin.readline()
    rounds = [attack(address, book)]
    Path(out).write_text(json.dumps(rounds))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--phases", type=int, default=3, help="quiet/attack phase pairs")
    p.add_argument("--steps", type=int, default=40, help="honest steps per quiet phase")
    p.add_argument("--out", default=str(RESULTS / "link_abuse.json"))
    p.add_argument(
        "--attacker-nice", type=int, default=19,
        help="niceness of the attacker's process (19: it stands for another machine; 0: "
        "it competes for this machine's cores like the cloud and the honest device)",
    )  # fmt: skip
    p.add_argument("--workdir", help="where the cloud's log and config go (default: /tmp)")
    p.add_argument("--echo-cloud", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--attack", nargs=3, metavar=("ADDRESS", "TOKENS", "OUT"), help=argparse.SUPPRESS
    )
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--max-message-mb", type=float, default=4.0, help=argparse.SUPPRESS)
    p.add_argument("--idle-s", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, default=200.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo_cloud:
        limits = Limits(messages_per_s=args.rate, burst=int(2 * args.rate), idle_s=args.idle_s)
        serve_echo(args.tokens, args.port_file, args.max_message_mb, limits)
        return 0
    if args.attack:
        _attacker(*args.attack, niceness=args.attacker_nice)
        return 0
    return run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> int:
    import torch

    from cotune.config import build_config, to_toml
    from cotune.data import encode, load_task, make_loader
    from cotune.methods import resolve
    from cotune.methods.split import SplitDevice, build_split
    from cotune.models import load_tokenizer
    from cotune.runtime.split.launch import grpc_connector

    torch.set_num_threads(1)
    cfg = build_config(CONFIG)
    resolve(cfg)
    total = args.phases * 2 * args.steps + 4
    task = load_task(cfg.task, cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    loader = make_loader(
        encode(task.train, tok, cfg.train.max_seq_len), cfg.train.batch_size, True, cfg.seed,
        tok.pad_token_id,
    )  # fmt: skip
    batches: list[Any] = []
    while len(batches) < total:
        batches.extend(b for _, b in zip(range(total - len(batches)), loader, strict=False))

    with tempfile.TemporaryDirectory(prefix="cotune-abuse-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        tokens = write_token_file(folder / "tokens", [0, 1, 2, 3, 4])
        cloud_cfg = cfg.model_copy(deep=True)
        cloud_cfg.runtime.tokens = str(folder / "tokens")
        (folder / "config.toml").write_text(to_toml(cloud_cfg))
        port_file = folder / "port"
        log = (folder / "cloud.log").open("w")
        cloud = subprocess.Popen(
            [sys.executable, "-m", "cotune", "cloud", "--config", str(folder / "config.toml"),
             "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            port = wait_for_port(port_file, cloud, 900)
            address = f"127.0.0.1:{port}"
            split, codec = build_split(cfg, task.num_labels, task.kind)
            dev = SplitDevice(
                cfg, split, codec, grpc_connector(cfg, address, tokens[0], 0)(),
                num_labels=task.num_labels, problem=task.kind,
            )  # fmt: skip
            dev.connect(cfg.train.steps)  # the LR schedule: longer than the benchmark
            for b in batches[:4]:  # warm-up
                dev.train_step(b)
            times: dict[str, list[float]] = {"quiet": [], "attack": []}
            seen: list[dict[str, Any]] = []
            rss_before = peak_rss_kb(cloud.pid)
            load_before = os.getloadavg()
            counter = [4]

            def step_once() -> float:
                t0 = time.perf_counter()
                dev.train_step(batches[counter[0] % len(batches)])
                counter[0] += 1
                return time.perf_counter() - t0

            for phase in range(args.phases):
                for _ in range(args.steps):  # quiet
                    times["quiet"].append(step_once())
                report = folder / f"attack-{phase}.json"
                attacker = subprocess.Popen(
                    [sys.executable, __file__, "--attacker-nice", str(args.attacker_nice),
                     "--attack", address,
                     json.dumps({d: tokens[d] for d in (1, 2, 3, 4)}), str(report)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                assert attacker.stdin is not None and attacker.stdout is not None
                while not select.select([attacker.stdout], [], [], 0)[0]:
                    step_once()  # untimed: the attacker's process is still importing
                attacker.stdout.readline()
                attacker.stdin.write("go\n")
                attacker.stdin.close()  # one attack round
                while attacker.poll() is None:  # timed: every step while it attacks
                    times["attack"].append(step_once())
                seen.extend(json.loads(report.read_text()))
                print(
                    f"phase {phase + 1}: "
                    + ", ".join(
                        f"{k} {statistics.median(v) * 1e3:.1f} ms ({len(v)})"
                        for k, v in times.items()
                    ),
                    flush=True,
                )
            rss_after = peak_rss_kb(cloud.pid)
            load_after = os.getloadavg()
            dev.transport.close()
        except BaseException:
            log.flush()
            print("the cloud's log ends:\n" + (folder / "cloud.log").read_text()[-3000:])
            raise
        finally:
            cloud.terminate()
            cloud.wait(120)
            log.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "setup": {
            "cloud": "cotune cloud, split, tiny-bert, cut 2, batch 8 x 64 tokens, 1 thread",
            "limits": {
                k: CONFIG["runtime"][k]
                for k in ("max_message_mb", "stream_idle_s", "max_messages_per_s")
            },
            "max_streams_per_device": cfg.runtime.max_streams_per_device,
            "phases": args.phases,
            "attacker_nice": args.attacker_nice,
            "quiet_steps_per_phase": args.steps,
            "attack": "50 streams with the device's token, 50 with bogus tokens, one 256 MB "
            "message, one message stalled after 1 kB of 1 MB, a flood of 5000 messages",
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_before": load_before,
            "load_avg_after": load_after,
        },
        "median_step_s": med,
        "ratio_attack_over_quiet": med["attack"] / med["quiet"],
        "target_ratio": 1.2,
        "cloud_peak_rss_kb": {"before_attacks": rss_before, "after_attacks": rss_after},
        "attacker_saw": seen,
        "step_s": times,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_s", "ratio_attack_over_quiet",
                                             "cloud_peak_rss_kb")}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
