"""Secure federated deployment: `cotune keys` makes a CA, a server certificate and
SuperNode key pairs Flower accepts; the loopback federation serves TLS with SuperNode
authentication; a node whose key was never registered is refused, a revoked node is
cut off and cannot rejoin, and a fedlora round completes with the registered nodes."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from helpers import eventually, node_files, node_rows, write_rows

from cotune.cli.main import main
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.credentials import KeyFolder, init_keys
from cotune.runtime.federated.deployment import CONNECTION, LocalFederation, flower_env
from cotune.runtime.launcher import console_script


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_init_and_add_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "keys"
    code = main(["keys", "init", str(folder), "--host", "cloud.example.org", "--host",
                 "10.0.0.5", "--node", "clinic-a"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    keys = KeyFolder(folder)
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cloud.example.org", "localhost"]
    ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    assert ips == ["10.0.0.5", "127.0.0.1", "::1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private in (keys.ca_key, keys.server_key, keys.node_key("clinic-a")):
        assert _mode(private) == 0o600, private
    assert _mode(folder) == 0o700
    # the node's key pair is what Flower reads: an OpenSSH P-384 private key, and a
    # public key `flwr supernode register` accepts
    node_key = load_ssh_private_key(keys.node_key("clinic-a").read_bytes(), None)
    assert isinstance(node_key, ec.EllipticCurvePrivateKey)
    assert node_key.curve.name == "secp384r1"
    assert try_load_public_key(keys.node_pub("clinic-a"))

    assert main(["keys", "add-node", str(folder), "clinic-b"]) == 0
    assert keys.node_names() == ["clinic-a", "clinic-b"]
    capsys.readouterr()
    # no silent overwrite of a CA or of a node's key; bad names and hosts are refused
    assert main(["keys", "init", str(folder)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["keys", "add-node", str(folder), "clinic-b"]) == 2
    assert main(["keys", "add-node", str(folder), "../evil"]) == 2
    assert main(["keys", "init", str(tmp_path / "k2"), "--host", "bad host!"]) == 2
    assert main(["keys", "add-node", str(tmp_path / "none"), "x"]) == 2
    assert "cotune keys init" in capsys.readouterr().err


def test_keys_init_with_a_ca_of_ones_own(tmp_path: Path) -> None:
    mine = init_keys(tmp_path / "mine", nodes=[])
    keys = init_keys(tmp_path / "k", ca_cert=mine.ca_cert, ca_key=mine.ca_key, nodes=["n"])
    assert keys.ca_cert.read_bytes() == mine.ca_cert.read_bytes()
    ca = x509.load_pem_x509_certificate(mine.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(keys.server_cert.read_bytes()).verify_directly_issued_by(ca)


def _nodes(fed: LocalFederation) -> dict[int, str]:
    """Flower's node list: node id -> status."""
    proc = subprocess.run(
        [console_script("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
        env=flower_env(fed.flwr_home), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    answer = json.loads(proc.stdout[proc.stdout.index("{") :])
    return {int(n["node-id"]): n["status"] for n in answer["nodes"]}


def _refused(log: Path) -> bool:
    return "Failed to activate SuperNode" in log.read_text()


@pytest.mark.slow  # a SuperLink and four SuperNode starts: ~1.5 min on a busy machine
def test_unregistered_node_is_refused_and_a_revoked_node_cannot_rejoin(tmp_path: Path) -> None:
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    with LocalFederation(tmp_path / "fed", 2, node_configs=nodes) as fed:
        assert fed.keys is not None
        superlink = (fed.log_dir / "superlink.log").read_text()
        assert "--insecure" not in " ".join(fed.children[0].args)
        assert "SuperLink Fleet HTTP API" in superlink
        online = lambda: sorted(_nodes(fed).values()) == ["online", "online"]  # noqa: E731
        assert eventually(online, timeout=120, every=1.0)

        intruder = fed.add_node("intruder", nodes[0], register=False)
        assert eventually(lambda: not intruder.alive(), timeout=120, every=0.5)
        assert intruder.returncode != 0 and _refused(intruder.log_path)
        assert len(_nodes(fed)) == 2 and fed.alive()

        revoked_id = fed.node_ids["node-1"]
        fed.revoke("node-1")
        assert _nodes(fed)[revoked_id] == "unregistered"
        assert eventually(lambda: not fed.nodes["node-1"].alive(), timeout=120, every=0.5)
        again = fed.add_node("node-1", nodes[1], register=False, log_name="again.log")
        assert eventually(lambda: not again.alive(), timeout=120, every=0.5)
        assert again.returncode != 0 and _refused(again.log_path)
        assert _nodes(fed)[fed.node_ids["node-0"]] == "online" and fed.alive()


@pytest.mark.slow
def test_fedlora_round_over_tls_with_node_auth_and_an_intruder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files, _ = node_files(tmp_path / "devices")
    dev = write_rows(tmp_path / "server" / "dev.csv", node_rows(9, 6))
    configs: list[dict[str, str | int | float | bool]] = [{"data-path": str(f)} for f in files]
    run_dir = tmp_path / "run"
    with LocalFederation(tmp_path / "fed", 2, node_configs=configs[:2]) as fed:
        intruder = fed.add_node("intruder", configs[2], register=False)
        args = ["run", "--out", str(run_dir)]
        for kv in (
            "method=fedlora", "model.name=tiny-bert", 'task.name="csv"',
            f"task.eval_file={dev}", "train.batch_size=4", "train.max_seq_len=16",
            "federated.clients=2", "federated.rounds=1", "federated.local_steps=1",
            "federated.round_timeout=300", "runtime.engine=deployment",
            f"runtime.superlink={fed.address}", f"runtime.tls_ca={fed.root_certificates}",
        ):  # fmt: skip
            args += ["--set", kv]
        code = main(args)
        assert not intruder.alive() and _refused(intruder.log_path)
    assert code == 0, capsys.readouterr().err
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert last["round"] == 1 and last["clients_ok"] == 2 and last["clients_failed"] == 0
    trained = {e["data_path"] for e in read_jsonl(run_dir / "train.jsonl") if e["event"] == "node"}
    assert trained == {str(files[0]), str(files[1])}  # not the intruder's
