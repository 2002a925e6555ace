"""Security and faults over gRPC on 127.0.0.1: tokens are required and checked before
anything else, malformed messages are refused for that device only, a device that drops
mid-step can come back, TLS works when certificates are given, message limits hold."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import batch_for, eventually, make_device, tiny_cfg

from cotune.link.auth import TokenBook
from cotune.link.errors import AuthError, LinkClosed, LinkError, MalformedMessage, TooLarge
from cotune.link.grpc_transport import GrpcTransport, TlsFiles
from cotune.link.proto import pb
from cotune.link.wire import to_wire
from cotune.runtime.split.serve import CloudServer

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = {0: "token-zero", 1: "token-one"}
STEPS = 20


@pytest.fixture
def server() -> Iterator[CloudServer]:
    srv = CloudServer(tiny_cfg("bert"), "127.0.0.1:0", TokenBook(TOKENS))
    yield srv
    srv.stop(grace=1)


def _device(srv: CloudServer, device_id: int, token: str | None, **kw):  # type: ignore[no-untyped-def]
    transport = GrpcTransport(srv.address, device_id, token, **kw)
    return make_device(srv.cfg, transport)


def _snapshot(srv: CloudServer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in srv.cloud.named.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_or_missing_token_is_refused_and_changes_nothing(server: CloudServer) -> None:
    for token in ("not-the-token", None, TOKENS[1]):  # TOKENS[1] is device 1's, not 0's
        dev = _device(server, 0, token)
        with pytest.raises(AuthError):
            dev.connect(STEPS)
        dev.transport.close()
    assert not server.cloud.built and server.endpoint.refused == 3

    good = _device(server, 0, TOKENS[0])
    good.connect(STEPS)
    good.train_step(batch_for("bert"))
    # the cloud's optimiser step runs after its answer is sent: let it finish before the
    # snapshot, or it could land between the two snapshots
    assert eventually(lambda: server.cloud.state(0).steps_done == 1)
    before, steps = _snapshot(server), server.cloud.steps
    intruder = _device(server, 1, "guess")
    with pytest.raises(AuthError):
        intruder.train_step(batch_for("bert"))  # straight to a training step: still refused
    intruder.transport.close()
    assert _same(before, _snapshot(server)) and server.cloud.steps == steps
    assert server.endpoint.active_devices() == [0]
    good.train_step(batch_for("bert"))
    good.transport.close()


def _corruptions(fwd: pb.Forward) -> dict[str, pb.Forward]:
    values = fwd.activations.parts["values"]
    n, k = values.shape
    out = {}
    shape = pb.Forward.FromString(fwd.SerializeToString())
    shape.activations.parts["values"].CopyFrom(to_wire(torch.zeros(n, k - 1)))
    shape.activations.shape[:] = [n, k - 1]
    out["shape"] = shape
    dtype = pb.Forward.FromString(fwd.SerializeToString())
    dtype.activations.parts["values"].CopyFrom(to_wire(torch.zeros(n, k, dtype=torch.float16)))
    out["dtype"] = dtype
    size = pb.Forward.FromString(fwd.SerializeToString())
    size.activations.parts["values"].data = values.data[:-8]
    out["size"] = size
    nan = pb.Forward.FromString(fwd.SerializeToString())
    bad = torch.zeros(n, k)
    bad[0, 0] = float("nan")
    nan.activations.parts["values"].CopyFrom(to_wire(bad))
    out["nan"] = nan
    labels = pb.Forward.FromString(fwd.SerializeToString())
    labels.labels.CopyFrom(to_wire(torch.tensor([0, 1, 99])))
    out["labels"] = labels
    mask = pb.Forward.FromString(fwd.SerializeToString())
    mask.batch_shape[:] = [3, 8]
    out["batch_shape"] = mask
    return out


def test_malformed_messages_get_an_error_while_others_train(server: CloudServer) -> None:
    batch = batch_for("bert")
    honest = _device(server, 0, TOKENS[0])
    honest.connect(STEPS)
    honest.train_step(batch)
    done: list[float] = []
    errors: list[BaseException] = []

    def train_honest() -> None:
        try:
            for _ in range(4):
                done.append(honest.train_step(batch))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    faulty = _device(server, 1, TOKENS[1])
    faulty.connect(STEPS)
    msg, _ = faulty._forward_message(batch, train=True)
    worker = threading.Thread(target=train_honest)
    worker.start()
    for name, bad in _corruptions(msg.forward).items():
        with pytest.raises(MalformedMessage):
            faulty.transport.request(pb.DeviceMessage(forward=bad), timeout=30)
        assert server.cloud.state(1).steps_done == 0, name
    worker.join(timeout=120)
    assert not errors and len(done) == 4
    # the faulty device's stream is still usable: a valid step goes through
    faulty.train_step(batch)
    assert eventually(lambda: server.cloud.state(1).steps_done == 1)
    assert eventually(lambda: server.cloud.state(0).steps_done == 5)
    honest.transport.close()
    faulty.transport.close()


def test_device_dropping_mid_step_can_reconnect(server: CloudServer) -> None:
    batch = batch_for("bert")
    dev = _device(server, 0, TOKENS[0])
    dev.connect(STEPS)
    dev.train_step(batch)
    msg, _ = dev._forward_message(batch, train=True)
    dev.transport.send(msg)  # step 1 sent; the device dies before the gradient arrives
    dev.transport.abort()
    eventually(lambda: server.endpoint.active_devices() == [])  # the cloud notices the drop
    assert server.endpoint.active_devices() == []
    assert server.cloud.state(0).steps_done in (1, 2)  # the cloud may have finished it

    again = GrpcTransport(server.address, 0, TOKENS[0])
    dev.optimizer.zero_grad(set_to_none=True)
    dev.connect(STEPS, again)
    assert dev.steps_done == server.cloud.state(0).steps_done  # both sides agree
    dev.train_step(batch)
    assert eventually(lambda: dev.steps_done == server.cloud.state(0).steps_done)
    lr = server.cloud.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(dev.optimizer.param_groups[0]["lr"])  # same LR schedule
    again.close()


def _self_signed(tmp: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cotune-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cloud.pem", tmp / "cloud.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_tls_when_certificates_are_given(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    cfg = tiny_cfg("bert", runtime={"tls_cert": cert, "tls_key": key})
    srv = CloudServer(cfg, "127.0.0.1:0", TokenBook(TOKENS))
    try:
        assert srv.tls is not None
        dev = _device(srv, 0, TOKENS[0], tls=TlsFiles(ca=cert))
        dev.connect(STEPS)
        dev.train_step(batch_for("bert"))
        dev.transport.close()
        plain = _device(srv, 1, TOKENS[1], connect_timeout=2)  # no TLS against TLS: refused
        with pytest.raises(LinkError):
            plain.connect(STEPS)
        plain.transport.close()
    finally:
        srv.stop(grace=1)


def test_message_size_limit() -> None:
    cfg = tiny_cfg("bert", runtime={"max_message_mb": 0.002})  # ~2 KB: a batch is larger
    srv = CloudServer(cfg, "127.0.0.1:0", TokenBook(TOKENS))
    try:
        dev = _device(srv, 0, TOKENS[0])  # the device itself allows 64 MB
        dev.connect(STEPS)
        with pytest.raises((TooLarge, LinkClosed)) as info:
            dev.train_step(batch_for("bert", length=16))
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert srv.cloud.state(0).steps_done == 0
        dev.transport.close()
    finally:
        srv.stop(grace=1)
