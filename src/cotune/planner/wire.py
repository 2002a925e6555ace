"""Exact bytes of a split training step: the messages a device and the cloud exchange,
built with the transport's own encoders on zero tensors of the right shapes.

Protobuf sizes depend on shapes and field presence, not on tensor values (raw bytes),
except for the step number's varint and the loss field (absent when exactly 0.0), so a
message of the right shape is the message's size. Each message also costs gRPC's 5-byte
prefix (`cotune.link.accounting`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cotune.config.schema import LinkConfig
from cotune.link.accounting import GRPC_PREFIX_BYTES
from cotune.link.codecs import make_codec
from cotune.link.proto import pb
from cotune.link.wire import pack_mask, to_wire


@dataclass(frozen=True)
class StepBytes:
    """Bytes of one training step (messages including gRPC's prefix)."""

    up: int
    down: int

    @property
    def total(self) -> int:
        return self.up + self.down


def split_step_bytes(
    link: LinkConfig,
    *,
    batch: int,
    length: int,
    real_tokens: int,
    width: int,
    step: int = 1,
    label_dtype: torch.dtype = torch.int64,
) -> StepBytes:
    """One training step of a split run with the labels on the cloud: a Forward up
    (the mask as bits, `real_tokens` rows of `width` values in the codec's format, the
    labels) and a Result down (the loss and the rows' gradient in the same format)."""
    codec = make_codec(link)
    rows = torch.zeros(real_tokens, width)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask.view(-1)[:real_tokens] = True
    fwd = pb.Forward(
        step=step, train=True, backward=True, batch_shape=[batch, length],
        activations=codec.forward.encode(rows),
    )  # fmt: skip
    fwd.mask.CopyFrom(pack_mask(mask))
    fwd.labels.CopyFrom(to_wire(torch.zeros(batch, dtype=label_dtype)))
    up = pb.DeviceMessage(forward=fwd).ByteSize() + GRPC_PREFIX_BYTES
    result = pb.Result(step=step, loss=1.0)
    result.grad.CopyFrom(codec.backward.encode(rows))
    down = pb.CloudMessage(result=result).ByteSize() + GRPC_PREFIX_BYTES
    return StepBytes(up=up, down=down)


def state_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a state dict of `shapes` as one `Aggregate` message (splitfed's round)."""
    msg = pb.Aggregate(round=1, weight=1.0)
    for name, shape in shapes.items():
        msg.state[name].CopyFrom(to_wire(torch.zeros(shape, dtype=dtype)))
    return pb.DeviceMessage(aggregate=msg).ByteSize() + GRPC_PREFIX_BYTES
