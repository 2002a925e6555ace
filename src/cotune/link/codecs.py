"""Link codecs: how the tensors crossing the cut are encoded, both ways.

A codec has a *wire format* that encodes a 2-D float tensor of token rows ([N, k]) into
a `pb.Encoded` message and back:

| format | payload per token row of width k | lossy |
|---|---|---|
| `fp32` | k float32 | no |
| `fp16` / `bf16` | k 16-bit floats | rounding |
| `int8` | k int8 + one float32 scale (max-abs / 127) | quantisation |
| `topk` | ceil(keep*k) float32 values + their int16/int32 column indices | sparsification |

`make_codec(link)` maps `link.codec` to the formats used for activations (device ->
cloud) and gradients (cloud -> device); gradients always use the same family as the
activations. Two codecs also change *what* crosses, not only how:

- `pca`: the device projects the cut activations onto a rank-r basis calibrated on its
  own data (`cotune.link.pca`), the cloud maps the r-dim code back to the full width
  (the residual stream is kept, compressed);
- `sft`: the cut layer's first FFN matrix is factorised (`cotune.models.cut`); only the
  r-dim bottleneck code crosses.
For both, the code and its gradient travel in `link.code_format` (fp32 by default;
`int8` sends r bytes plus one float32 scale per token row: at r = 8, 12 bytes against
the 32 of fp32 and the 1,536 of a full-width fp32 row of minilm).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from cotune.config.schema import LinkConfig
from cotune.link.errors import MalformedMessage
from cotune.link.proto import pb
from cotune.link.wire import from_wire, to_wire

INT8_MAX = 127.0


class WireFormat(ABC):
    """Encodes token rows [N, k] of float32 values for the wire."""

    name: str

    @abstractmethod
    def encode(self, x: torch.Tensor) -> pb.Encoded:
        """Encode a [N, k] tensor (any float dtype)."""

    @abstractmethod
    def decode(self, msg: pb.Encoded, what: str, rows: int, width: int) -> torch.Tensor:
        """Decode and validate an [rows, width] float32 tensor; `MalformedMessage` if not."""

    def _check_header(self, msg: pb.Encoded, what: str, rows: int, width: int) -> None:
        if msg.format != self.name:
            raise MalformedMessage(f"{what}: format {msg.format!r} where {self.name!r} is expected")
        if list(msg.shape) != [rows, width]:
            raise MalformedMessage(
                f"{what}: shape {list(msg.shape)} where {[rows, width]} is expected"
            )
        expected = set(self.parts)
        if set(msg.parts) != expected:
            raise MalformedMessage(
                f"{what}: parts {sorted(msg.parts)} where {sorted(expected)} are expected"
            )

    parts: tuple[str, ...] = ("values",)


def _encoded(name: str, shape: list[int], **parts: pb.Tensor) -> pb.Encoded:
    msg = pb.Encoded(format=name, shape=shape)
    for key, value in parts.items():
        msg.parts[key].CopyFrom(value)
    return msg


class FloatFormat(WireFormat):
    """Values cast to a float dtype: fp32 (exact), fp16 or bf16."""

    _DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    _WIRE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

    def __init__(self, name: str) -> None:
        if name not in self._DTYPES:
            raise ValueError(f"unknown float format {name!r}")
        self.name = name
        self.dtype = self._DTYPES[name]

    def encode(self, x: torch.Tensor) -> pb.Encoded:
        return _encoded(self.name, list(x.shape), values=to_wire(x.detach().to(self.dtype)))

    def decode(self, msg: pb.Encoded, what: str, rows: int, width: int) -> torch.Tensor:
        self._check_header(msg, what, rows, width)
        values = from_wire(
            msg.parts["values"], f"{what}.values", dtypes=(self._WIRE[self.name],),
            shape=(rows, width),
        )  # fmt: skip
        return values.to(torch.float32)


class Int8Format(WireFormat):
    """Symmetric int8 quantisation with one float32 scale per token row."""

    name = "int8"
    parts = ("values", "scales")

    def encode(self, x: torch.Tensor) -> pb.Encoded:
        x = x.detach().to(torch.float32)
        scales = x.abs().amax(dim=-1) / INT8_MAX
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(x / safe.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return _encoded(self.name, list(x.shape), values=to_wire(q), scales=to_wire(scales))

    def decode(self, msg: pb.Encoded, what: str, rows: int, width: int) -> torch.Tensor:
        self._check_header(msg, what, rows, width)
        q = from_wire(msg.parts["values"], f"{what}.values", dtypes=("int8",), shape=(rows, width))
        scales = from_wire(
            msg.parts["scales"], f"{what}.scales", dtypes=("float32",), shape=(rows,)
        )
        if bool((scales < 0).any()):
            raise MalformedMessage(f"{what}.scales: negative scale")
        return q.to(torch.float32) * scales.unsqueeze(-1)


class TopKFormat(WireFormat):
    """Per token row, the `keep` fraction of largest-magnitude values and their columns."""

    name = "topk"
    parts = ("values", "indices")

    def __init__(self, keep: float) -> None:
        if not 0 < keep <= 1:
            raise ValueError("topk keep must be in (0, 1]")
        self.keep = keep

    def kept(self, width: int) -> int:
        return max(1, min(width, math.ceil(self.keep * width)))

    @staticmethod
    def _index_dtype(width: int) -> torch.dtype:
        return torch.int16 if width <= 2**15 else torch.int32

    def encode(self, x: torch.Tensor) -> pb.Encoded:
        x = x.detach().to(torch.float32)
        k = self.kept(x.shape[-1])
        idx = x.abs().topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        values = x.gather(-1, idx)
        return _encoded(
            self.name, list(x.shape),
            values=to_wire(values), indices=to_wire(idx.to(self._index_dtype(x.shape[-1]))),
        )  # fmt: skip

    def decode(self, msg: pb.Encoded, what: str, rows: int, width: int) -> torch.Tensor:
        self._check_header(msg, what, rows, width)
        k = self.kept(width)
        values = from_wire(
            msg.parts["values"], f"{what}.values", dtypes=("float32",), shape=(rows, k)
        )
        index_name = "int16" if self._index_dtype(width) == torch.int16 else "int32"
        idx = from_wire(
            msg.parts["indices"], f"{what}.indices", dtypes=(index_name,), shape=(rows, k)
        ).to(torch.int64)
        if idx.numel() and (bool((idx < 0).any()) or bool((idx >= width).any())):
            raise MalformedMessage(f"{what}.indices: a column index is outside [0, {width})")
        if k > 1 and idx.numel() and bool((idx[:, 1:] <= idx[:, :-1]).any()):
            raise MalformedMessage(f"{what}.indices: indices must be strictly increasing per row")
        out = torch.zeros(rows, width, dtype=torch.float32)
        return out.scatter_(1, idx, values)


@dataclass(frozen=True)
class Codec:
    """What `link.codec` selects: the wire formats both ways and the cut's bottleneck.

    `projection_rank`: `pca` projects the cut activations to this rank (calibrated on the
    device). `sft_rank`: the cut layer's FFN is factorised at this rank (the model cut
    does it). `top_format` encodes the U-shaped return crossing (pooled features and
    their gradient), which no bottleneck applies to.
    """

    name: str
    forward: WireFormat
    backward: WireFormat
    top_forward: WireFormat
    top_backward: WireFormat
    projection_rank: int | None = None
    sft_rank: int | None = None


def make_codec(link: LinkConfig) -> Codec:
    """The codec `link.codec` names, with `link.rank` / `link.keep` applied."""
    name = link.codec
    if name in ("pca", "sft"):
        fmt: WireFormat = (
            Int8Format() if link.code_format == "int8" else FloatFormat(link.code_format)
        )
    elif name == "identity":
        fmt = FloatFormat("fp32")
    elif name in ("fp16", "bf16"):
        fmt = FloatFormat(name)
    elif name == "int8":
        fmt = Int8Format()
    elif name == "topk":
        fmt = TopKFormat(link.keep)
    else:  # the schema's Literal makes this unreachable from a config
        raise ValueError(f"unknown codec {name!r}")
    # the U-shaped return crossing (pooled features) has no bottleneck: pca and sft send it
    # in fp32 whatever the code's format
    top = FloatFormat("fp32") if name in ("pca", "sft") else fmt
    return Codec(
        name=name,
        forward=fmt,
        backward=fmt,
        top_forward=top,
        top_backward=top,
        projection_rank=link.rank if name == "pca" else None,
        sft_rank=link.rank if name == "sft" else None,
    )
