"""Byte accounting: the bytes a transport reports are the lengths of the messages it put
on the wire (decoded here from a tap on the wire), plus gRPC's 5-byte prefix per message
and the call metadata; activations cross as r values per real token with `sft` and as
the hidden size with `identity`; in-process and gRPC count the same."""

from __future__ import annotations

import pytest
import torch
from helpers import TOKEN, batch_for, inprocess_pair, make_device, tiny_cfg

from cotune.link.accounting import GRPC_PREFIX_BYTES
from cotune.link.auth import TokenBook
from cotune.link.grpc_transport import GrpcTransport
from cotune.link.proto import pb
from cotune.runtime.split.serve import CloudServer

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 64  # tiny models


def _exchange(device, batch) -> None:  # type: ignore[no-untyped-def]
    device.train_step(batch)
    device.train_step(batch)
    device.eval()
    device(labels=batch["labels"], **{k: v for k, v in batch.items() if k != "labels"})


def _check_tap(wire: list[tuple[str, bytes]], meter) -> list[pb.Forward]:  # type: ignore[no-untyped-def]
    metadata = len("cotune-device-id") + len("0") + len("authorization") + len("Bearer " + TOKEN)
    totals = {"up": metadata, "down": 0}
    forwards = []
    for direction, data in wire:
        msg = (pb.DeviceMessage if direction == "up" else pb.CloudMessage).FromString(data)
        assert msg.ByteSize() == len(data)
        totals[direction] += len(data) + GRPC_PREFIX_BYTES
        if direction == "up" and msg.WhichOneof("kind") == "forward":
            forwards.append(msg.forward)
    assert (meter.up, meter.down) == (totals["up"], totals["down"])
    return forwards


@pytest.mark.parametrize(("codec", "width"), [("identity", HIDDEN), ("sft", 4)])
def test_reported_bytes_are_the_wire_bytes(codec: str, width: int) -> None:
    cfg = tiny_cfg("bert", link={"codec": codec, "rank": 4})
    wire: list[tuple[str, bytes]] = []
    device, _, _ = inprocess_pair(cfg, tap=lambda d, b: wire.append((d, b)))
    batch = batch_for("bert")
    _exchange(device, batch)
    forwards = _check_tap(wire, device.transport.meter)
    real_tokens = int(batch["attention_mask"].sum())
    assert len(forwards) == 3
    for fwd in forwards:
        values = fwd.activations.parts["values"]
        assert list(values.shape) == [real_tokens, width]  # only real tokens cross
        assert len(values.data) == real_tokens * width * 4  # fp32
        assert len(fwd.mask.data) == (batch["attention_mask"].numel() + 7) // 8  # bits
        assert fwd.HasField("labels")
    phases = device.transport.meter.by_phase
    assert set(phases) == {"control", "train", "eval"}
    assert sum(p["up"] for p in phases.values()) == device.transport.meter.up


def test_grpc_counts_what_inprocess_counts() -> None:
    cfg = tiny_cfg("bert", link={"codec": "int8"})
    batch = batch_for("bert")
    device, _, _ = inprocess_pair(cfg)
    _exchange(device, batch)
    server = CloudServer(cfg, "127.0.0.1:0", TokenBook({0: TOKEN}))
    try:
        wire: list[tuple[str, bytes]] = []
        transport = GrpcTransport(server.address, 0, TOKEN, tap=lambda d, b: wire.append((d, b)))
        remote = make_device(cfg, transport)
        remote.connect(10)
        _exchange(remote, batch)
        _check_tap(wire, transport.meter)
        local, grpc_meter = device.transport.meter, transport.meter
        assert (grpc_meter.up, grpc_meter.down) == (local.up, local.down)
        # the cloud's own count (messages only) agrees with the device's
        served = server.endpoint.meter
        assert served.down == grpc_meter.down
        assert served.up == grpc_meter.up - (len(wire) and _metadata_bytes())
        transport.close()
    finally:
        server.stop()
    for a, b in zip(device.params, remote.params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _metadata_bytes() -> int:
    return len("cotune-device-id") + len("0") + len("authorization") + len("Bearer " + TOKEN)


@pytest.mark.parametrize(
    ("link", "labels", "per_token"),
    [
        ({"codec": "fp16"}, "cloud", HIDDEN * 2),
        ({"codec": "bf16"}, "device", HIDDEN * 2),
        ({"codec": "int8"}, "cloud", HIDDEN + 4),  # int8 values + a float32 scale
        ({"codec": "topk"}, "device", 7 * 4 + 7 * 2),  # ceil(0.1 * 64) = 7 float32 + int16 indices
        ({"codec": "pca"}, "cloud", 4 * 4),  # rank 4
        ({"codec": "sft"}, "cloud", 4 * 4),  # the rank-4 code of the cut layer's FFN
        ({"codec": "sft", "code_format": "int8"}, "device", 4 + 4),  # 4 int8 + a scale
        ({"codec": "pca", "code_format": "bf16"}, "cloud", 4 * 2),
    ],
)
def test_every_codec_trains_and_sends_its_payload(
    link: dict[str, str], labels: str, per_token: int
) -> None:
    cfg = tiny_cfg("bert", link={**link, "rank": 4}, split={"labels": labels})
    wire: list[tuple[str, bytes]] = []
    device, cloud, _ = inprocess_pair(cfg, tap=lambda d, b: wire.append((d, b)))
    batch = batch_for("bert")
    if link["codec"] == "pca":
        device.calibrate([batch_for("bert", seed=s) for s in range(3)])
    before = {n: p.detach().clone() for n, p in cloud.named.items()}
    losses = [device.train_step(batch) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p) for n, p in cloud.named.items())  # cloud learned
    real_tokens = int(batch["attention_mask"].sum())
    grads = 0
    for direction, data in wire:
        msg = (pb.DeviceMessage if direction == "up" else pb.CloudMessage).FromString(data)
        if direction == "up" and msg.WhichOneof("kind") == "forward":
            parts = msg.forward.activations.parts
            assert sum(len(t.data) for t in parts.values()) == real_tokens * per_token
            assert msg.forward.HasField("labels") == (labels == "cloud")
        if direction == "down" and msg.WhichOneof("kind") == "result":
            if msg.result.HasField("grad"):  # the activations' gradient, same format
                parts = msg.result.grad.parts
                assert sum(len(t.data) for t in parts.values()) == real_tokens * per_token
                grads += 1
            if msg.result.HasField("output") and labels == "device":  # pooled features
                assert list(msg.result.output.shape) == [3, HIDDEN]
                assert msg.result.output.format == (
                    "fp32" if link["codec"] in ("pca", "sft") else link["codec"]
                )
    assert grads == 2
    _check_tap(wire, device.transport.meter)
