"""Emulated links against a real shaped link: split gRPC step times per network profile.

The split gRPC path (minilm, full fine-tuning, SST-2 batches) runs between two Linux
network namespaces on this machine, `cotune-dev` (the device) and `cotune-cloud` (three
`cotune cloud` processes), joined by two veth pairs. For each profile three devices in
one process take steps in turn, one step each (so load drift on a shared machine hits
all three alike), on the same batches:

- `measured`: over veth pair A, shaped for real: `tc tbf` at the profile's uplink rate
  on the device's end, at its downlink rate on the cloud's end, and the one-way
  latency (+- jitter) added in both directions by a TCP relay in the cloud namespace
  (`relay` below, at real-time priority so that a loaded machine does not delay its
  chunks) in front of the cloud; no `[link.network]`;
- `throttle`: over veth pair B (unshaped), with `[link.network] profile = P, mode =
  "throttle"`: cotune paces the bytes itself (token bucket + delay, `cotune.link.pacing`);
- `clock`: over pair B with `mode = "clock"`: each step's measured (compute) time plus
  the time the simulated clock charged for its messages (`cotune.link.network`).

This kernel has no `sch_netem`: it is not built (CONFIG_NET_SCH_NETEM is not set in
/proc/config.gz, and there is no modprobe nor module tree), so `tc qdisc add ... netem`
fails with "Specified qdisc kind is unknown". What exists is used instead: `tbf` for the
rate (built in), and the propagation delay comes from the userspace relay, which holds
each chunk it reads for latency +- jitter (uniform, in order) before writing it on.
Consequences, all stated in the JSON too: the delay sits above TCP, so TCP's congestion
window never sees the long round trip (netem's would); `tbf` counts whole frames
(Ethernet + IP + TCP headers, ~4.6% over the payload of a full segment) and the ACKs
share the reverse link, which cotune's model leaves out (it counts message bytes only);
there is no packet loss (no netem to drop packets), so profiles are run with loss 0.

    sudo .venv/bin/python benchmarks/netem_link.py [--profiles lte constrained wifi] [--rounds 3]

Writes benchmarks/results/netem_link.json: per profile and way, the per-step times,
their medians and the ratios throttle/measured and clock/measured (target: within 10%).
Needs root (namespaces, veth, tc); the namespaces are removed when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEV_NS, CLOUD_NS = "cotune-dev", "cotune-cloud"
# veth pair A (shaped, through the relay) and B (unshaped): (device end, cloud end)
PAIR_A = ("cnd-a", "cnc-a", "10.77.1.1", "10.77.1.2")
PAIR_B = ("cnd-b", "cnc-b", "10.77.2.1", "10.77.2.2")
RELAY_PORT = 7000
WAYS = ("measured", "throttle", "clock")
NETEM_PROBE = "tc qdisc add dev lo root netem delay 10ms"


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["COTUNE_PROGRESS"] = "0"
    return env


# ----------------------------------------------------------------------------- the relay


def _pump(
    src: socket.socket, dst: socket.socket, delay_s: float, jitter_s: float, seed: int
) -> None:
    """Copy src -> dst, each chunk held for delay +- jitter (in order)."""
    rng = random.Random(seed)
    chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def write() -> None:
        while True:
            due, data = chunks.get()
            if not data:
                break
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    last = 0.0
    while True:
        try:
            data = src.recv(1 << 16)
        except OSError:
            data = b""
        now = time.perf_counter()
        due = max(last, now + max(0.0, delay_s + rng.uniform(-jitter_s, jitter_s)))
        last = due
        chunks.put((due, data))
        if not data:
            break
    writer.join()


def relay(listen: str, to: str, delay_ms: float, jitter_ms: float) -> int:
    """A TCP relay adding a one-way delay (+- jitter) in both directions."""
    host, port = listen.rsplit(":", 1)
    up_host, up_port = to.rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    print("relay ready", flush=True)
    n = 0
    while True:
        conn, _ = server.accept()
        upstream = socket.create_connection((up_host, int(up_port)))
        for s in (conn, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        d, j = delay_ms / 1000, jitter_ms / 1000
        threading.Thread(target=_pump, args=(conn, upstream, d, j, 2 * n), daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, conn, d, j, 2 * n + 1), daemon=True).start()
        n += 1


# ----------------------------------------------------------------------------- the device


def base_config(args: argparse.Namespace, total: int) -> dict[str, Any]:
    return {
        "method": "split",
        "task": {"name": "glue/sst2", "data_dir": args.data, "max_train_examples": 2000},
        "model": {"name": "minilm"},
        "train": {"steps": total, "batch_size": args.batch, "max_seq_len": args.seq,
                  "lr": 1e-4, "threads": 1},
        "split": {"cut": args.cut},
        "link": {"codec": "identity"},
        # in clear: the link runs between network namespaces of this machine only, and TLS
        # would add its own handshake and framing to what the benchmark compares
        "runtime": {"connect_timeout_s": 1800, "timeout_s": 1800, "insecure": True},
    }  # fmt: skip


def network(profile: str, mode: str) -> dict[str, Any]:
    return {"profile": profile, "mode": mode, "loss": 0.0}


def device(args: argparse.Namespace) -> int:
    """In the device namespace: three devices, interleaved rounds; JSON to args.result."""
    import torch

    from cotune.config import build_config
    from cotune.data import encode, load_task, make_loader
    from cotune.methods import resolve
    from cotune.methods.split import SplitDevice, build_split
    from cotune.models import load_tokenizer
    from cotune.runtime.split.launch import grpc_connector

    torch.set_num_threads(1)
    plan = json.loads(Path(args.plan).read_text())
    total = args.warmup + args.rounds * args.steps
    devices = {}
    for way in WAYS:
        raw = base_config(args, total)
        if way != "measured":
            raw["link"]["network"] = network(args.profile, way)
        cfg = resolve(build_config(raw))
        address, token = plan[way]["address"], plan[way]["token"]
        if not devices:
            task = load_task(cfg.task, cfg.seed)
            tok = load_tokenizer("minilm")
            loader = make_loader(encode(task.train, tok, args.seq), args.batch, True, cfg.seed,
                                 tok.pad_token_id)  # fmt: skip
            batches = [b for _, b in zip(range(total), loader, strict=False)]
        split, codec = build_split(cfg, task.num_labels, task.kind)
        dev = SplitDevice(cfg, split, codec, grpc_connector(cfg, address, token)(),
                          num_labels=task.num_labels, problem=task.kind)  # fmt: skip
        dev.connect(total)
        devices[way] = dev
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    charged: list[float] = []  # clock: the network time each step's messages were charged
    up: dict[str, list[int]] = {w: [] for w in WAYS}
    down: dict[str, list[int]] = {w: [] for w in WAYS}
    for i in range(args.warmup):
        for dev in devices.values():
            dev.train_step(batches[i])
    step = args.warmup
    for r in range(args.rounds):
        for k in range(args.steps):
            for way, dev in devices.items():  # one step each, in turn
                link = dev.transport.network
                meter = dev.transport.meter
                before = link.clock.seconds if link is not None else 0.0
                u0, d0 = meter.up, meter.down
                t0 = time.perf_counter()
                dev.train_step(batches[step + k])
                times[way].append(time.perf_counter() - t0)
                up[way].append(meter.up - u0)
                down[way].append(meter.down - d0)
                if way == "clock":
                    assert link is not None
                    charged.append(link.clock.seconds - before)
        step += args.steps
        shown = {**times, "clock": [c + n for c, n in zip(times["clock"], charged, strict=True)]}
        print(f"{args.profile} round {r + 1}: "
              + ", ".join(f"{w} {statistics.median(t):.3f}s" for w, t in shown.items()),
              flush=True)  # fmt: skip
    throttle_link = devices["throttle"].transport.network
    clock_link = devices["clock"].transport.network
    for dev in devices.values():
        dev.transport.close()
    out = {
        "step_s": times,
        "clock_compute_s": times["clock"],
        "clock_network_s": charged,
        "clock_projected_s": [c + n for c, n in zip(times["clock"], charged, strict=True)],
        "bytes_up_per_step": {w: statistics.mean(v) for w, v in up.items()},
        "bytes_down_per_step": {w: statistics.mean(v) for w, v in down.items()},
        "spec": clock_link.spec.as_dict() if clock_link is not None else None,
        "throttle_slept_s": throttle_link.slept_s if throttle_link is not None else None,
        "throttle_clock_s": throttle_link.clock.seconds if throttle_link is not None else None,
    }
    Path(args.result).write_text(json.dumps(out) + "\n")
    return 0


# ----------------------------------------------------------------------------- the host


def netem_available() -> tuple[bool, str]:
    """Try a netem qdisc in a scratch namespace; (available, what the kernel said)."""
    sh("ip", "netns", "add", "cotune-probe")
    try:
        sh("ip", "link", "set", "lo", "up", ns="cotune-probe")
        probe = sh(*NETEM_PROBE.split(), ns="cotune-probe", check=False)
        return probe.returncode == 0, (probe.stderr or probe.stdout).strip()
    finally:
        sh("ip", "netns", "del", "cotune-probe", check=False)


def kernel_netem_config() -> str:
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if "NET_SCH_NETEM" in line:
                    return line.strip()
    except OSError:
        pass
    return "unknown (/proc/config.gz unreadable)"


def setup_namespaces() -> None:
    teardown_namespaces()
    for ns in (DEV_NS, CLOUD_NS):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    for dev_end, cloud_end, dev_ip, cloud_ip in (PAIR_A, PAIR_B):
        sh("ip", "link", "add", dev_end, "type", "veth", "peer", "name", cloud_end)
        sh("ip", "link", "set", dev_end, "netns", DEV_NS)
        sh("ip", "link", "set", cloud_end, "netns", CLOUD_NS)
        sh("ip", "addr", "add", f"{dev_ip}/24", "dev", dev_end, ns=DEV_NS)
        sh("ip", "addr", "add", f"{cloud_ip}/24", "dev", cloud_end, ns=CLOUD_NS)
        sh("ip", "link", "set", dev_end, "up", ns=DEV_NS)
        sh("ip", "link", "set", cloud_end, "up", ns=CLOUD_NS)


def teardown_namespaces() -> None:
    for ns in (DEV_NS, CLOUD_NS):
        sh("ip", "netns", "del", ns, check=False)


def shape(up_mbps: float, down_mbps: float) -> list[str]:
    """tbf on pair A: the uplink on the device's end, the downlink on the cloud's."""
    cmds = []
    for ns, dev, rate in ((DEV_NS, PAIR_A[0], up_mbps), (CLOUD_NS, PAIR_A[1], down_mbps)):
        cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate:g}mbit",
               "burst", "32kb", "limit", "16mb"]  # fmt: skip
        sh(*cmd, ns=ns)
        cmds.append(f"ip netns exec {ns} " + " ".join(cmd))
    return cmds


def start(args: list[str], ns: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=f,
                                stderr=subprocess.STDOUT, env=child_env())  # fmt: skip


def wait_file(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 600) -> str:
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in {timeout} s")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def run_profile(args: argparse.Namespace, profile: str, tmp: Path) -> dict[str, Any]:
    from cotune.config import NetworkConfig, build_config, to_toml
    from cotune.link.auth import write_token_file
    from cotune.link.network import network_spec

    spec = network_spec(NetworkConfig(**network(profile, "clock")))
    commands = shape(spec.up_mbps, spec.down_mbps)
    total = args.warmup + args.rounds * args.steps
    procs: list[subprocess.Popen[bytes]] = []
    plan: dict[str, dict[str, str]] = {}
    try:
        for way in WAYS:
            folder = tmp / f"{profile}-{way}"
            folder.mkdir()
            token = write_token_file(folder / "tokens", [0])[0]
            raw = base_config(args, total)
            raw["runtime"]["tokens"] = str(folder / "tokens")
            (folder / "config.toml").write_text(to_toml(build_config(raw)))
            host = "127.0.0.1" if way == "measured" else PAIR_B[3]
            cloud = start([sys.executable, "-m", "cotune", "cloud", "--config",
                           str(folder / "config.toml"), "--listen", f"{host}:0",
                           "--port-file", str(folder / "port")], CLOUD_NS, folder / "cloud.log")  # fmt: skip
            procs.append(cloud)
            port = wait_file(folder / "port", cloud, f"the {way} cloud")
            if way == "measured":
                ready = folder / "relay.log"
                # real-time priority: on a loaded machine a waiting relay would add
                # scheduling delay to every chunk, which a kernel qdisc would not
                relay_proc = start(["chrt", "-f", "10", sys.executable, __file__, "relay", "--listen",
                                    f"{PAIR_A[3]}:{RELAY_PORT}", "--to", f"127.0.0.1:{port}",
                                    "--delay-ms", str(spec.latency_ms),
                                    "--jitter-ms", str(spec.jitter_ms)], CLOUD_NS, ready)  # fmt: skip
                procs.append(relay_proc)
                wait_file(ready, relay_proc, "the relay")
                plan[way] = {"address": f"{PAIR_A[3]}:{RELAY_PORT}", "token": token}
            else:
                plan[way] = {"address": f"{PAIR_B[3]}:{port}", "token": token}
        plan_path = tmp / f"{profile}-plan.json"
        plan_path.write_text(json.dumps(plan))
        result_path = tmp / f"{profile}-result.json"
        dev = subprocess.run(
            ["ip", "netns", "exec", DEV_NS, sys.executable, __file__, "device", "--plan",
             str(plan_path), "--result", str(result_path), "--profile", profile,
             *forwarded(args)],
            env=child_env(), check=False,
        )  # fmt: skip
        if dev.returncode != 0:
            raise RuntimeError(f"the device for {profile} exited with {dev.returncode}")
        got = json.loads(result_path.read_text())
    finally:
        stop(procs)
    med = {w: statistics.median(got["step_s"][w]) for w in WAYS}
    med["clock"] = statistics.median(got["clock_projected_s"])
    return {
        "spec": spec.as_dict(),
        "tc": commands,
        "relay": f"one-way delay {spec.latency_ms:g} ms +- {spec.jitter_ms:g} ms (uniform, in order)",
        "median_step_s": med,
        "clock_median_compute_s": statistics.median(got["clock_compute_s"]),
        "clock_median_network_s": statistics.median(got["clock_network_s"]),
        # how much of a step the network is: where it is small, the comparison is one
        # of compute times (noise on a shared machine), not of links
        "network_share": statistics.median(got["clock_network_s"]) / med["clock"],
        "ratio_throttle_to_measured": med["throttle"] / med["measured"],
        "ratio_clock_to_measured": med["clock"] / med["measured"],
        "within_10pct": {
            "throttle": abs(med["throttle"] / med["measured"] - 1) <= 0.10,
            "clock": abs(med["clock"] / med["measured"] - 1) <= 0.10,
        },
        **{
            k: got[k]
            for k in (
                "bytes_up_per_step",
                "bytes_down_per_step",
                "throttle_slept_s",
                "throttle_clock_s",
                "step_s",
                "clock_network_s",
                "clock_projected_s",
            )
        },  # fmt: skip
    }


def forwarded(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup",
            str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
            "--cut", str(args.cut), "--data", args.data]  # fmt: skip


def host(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("netem_link.py needs root (network namespaces, veth, tc)", file=sys.stderr)
        return 2
    netem, said = netem_available()
    setup_namespaces()
    load_before = os.getloadavg()
    profiles: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="cotune-netem-") as tmp:
            for profile in args.profiles:
                profiles[profile] = run_profile(args, profile, Path(tmp))
                print(json.dumps({profile: {k: profiles[profile][k] for k in
                                            ("median_step_s", "within_10pct")}}), flush=True)  # fmt: skip
    finally:
        teardown_namespaces()
    result = {
        "what": "split gRPC step time (minilm, full fine-tuning, SST-2) over a real shaped "
        "link between two network namespaces vs cotune's throttle and clock for the same "
        "profile",
        "netem": {
            "available": netem,
            "probe": NETEM_PROBE,
            "kernel_said": said,
            "kernel_config": kernel_netem_config(),
            "instead": "tbf (rate) on each veth end + a userspace TCP relay in the cloud "
            "namespace (one-way delay +- jitter, both directions); no packet loss",
        },
        "caveats": [
            "the relay's delay sits above TCP: TCP's congestion window sees a short round "
            "trip (netem's delay would be seen by TCP)",
            "tbf counts whole frames (Ethernet + IP + TCP headers) and the ACKs share the "
            "reverse link; cotune's model counts message bytes (+ gRPC's 5-byte prefix) only",
            "profiles run with loss = 0: without netem nothing drops packets",
        ],
        "setup": {
            "model": "minilm, full fine-tuning",
            "codec": "identity",
            "cut": args.cut,
            "batch_size": args.batch,
            "max_seq_len": args.seq,
            "threads": 1,
            "timed_steps_per_way": args.rounds * args.steps,
            "rounds": args.rounds,
            "warmup_steps": args.warmup,
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },  # fmt: skip
        "profiles": profiles,
        "target": "throttle and clock median step within 10% of measured",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ok = all(all(p["within_10pct"].values()) for p in profiles.values())
    print(f"wrote {out}; all within 10%: {ok}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("role", nargs="?", default="host", choices=("host", "device", "relay"))
    p.add_argument("--profiles", nargs="+", default=["lte", "constrained", "wifi"])
    p.add_argument("--steps", type=int, default=8, help="timed steps per way per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--cut", type=int, default=3)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "SST-2"))
    p.add_argument("--out", default=str(RESULTS / "netem_link.json"))
    # internal: the device and relay roles
    p.add_argument("--plan")
    p.add_argument("--result")
    p.add_argument("--profile")
    p.add_argument("--listen")
    p.add_argument("--to")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    args = p.parse_args()
    if args.role == "relay":
        return relay(args.listen, args.to, args.delay_ms, args.jitter_ms)
    if args.role == "device":
        return device(args)
    return host(args)


if __name__ == "__main__":
    sys.exit(main())
