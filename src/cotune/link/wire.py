"""Tensors on the wire: torch tensor <-> `pb.Tensor`, with strict validation on decode.

Every tensor is raw little-endian bytes in C order. Decoding checks dtype, shape, byte
length, an element budget and (for floats) finiteness before anything touches the
model, so a malformed message is refused with `MalformedMessage` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cotune.link.errors import MalformedMessage
from cotune.link.proto import pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_NAMES = ("float32", "float16", "bfloat16")
BITS = "bits"

# Largest tensor a message may declare (elements); the gRPC message limit bounds bytes.
MAX_ELEMENTS = 1 << 28


def to_wire(t: torch.Tensor) -> pb.Tensor:
    """Encode `t` as it is (dtype kept, made contiguous on the CPU)."""
    t = t.detach().to("cpu").contiguous()
    name = NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"dtype {t.dtype} cannot go on the wire; use one of {sorted(DTYPES)}")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return pb.Tensor(dtype=name, shape=list(t.shape), data=raw.numpy().tobytes())


def _numel(shape: Sequence[int], what: str) -> int:
    n = 1
    for s in shape:
        if s < 0:
            raise MalformedMessage(f"{what}: negative dimension in shape {list(shape)}")
        n *= s
        if n > MAX_ELEMENTS:
            raise MalformedMessage(f"{what}: shape {list(shape)} is over {MAX_ELEMENTS} elements")
    return n


def from_wire(
    msg: pb.Tensor,
    what: str,
    *,
    dtypes: Sequence[str] | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Decode and validate a `pb.Tensor`.

    `dtypes`: the dtype names allowed; `shape`: the expected shape (None = any size in
    that dimension); `finite`: refuse NaN/Inf in float tensors. Raises
    `MalformedMessage` naming `what` on any mismatch.
    """
    if msg.dtype not in DTYPES:
        raise MalformedMessage(f"{what}: unknown dtype {msg.dtype!r}")
    if dtypes is not None and msg.dtype not in dtypes:
        raise MalformedMessage(f"{what}: dtype {msg.dtype} where {'/'.join(dtypes)} is expected")
    dims = list(msg.shape)
    if shape is not None:
        if len(dims) != len(shape) or any(
            want is not None and got != want for got, want in zip(dims, shape, strict=True)
        ):
            want_s = ["*" if s is None else s for s in shape]
            raise MalformedMessage(f"{what}: shape {dims} where {want_s} is expected")
    n = _numel(dims, what)
    dtype = DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != n * itemsize:
        raise MalformedMessage(
            f"{what}: {len(msg.data)} data bytes for shape {dims} of {msg.dtype} "
            f"({n * itemsize} expected)"
        )
    if n == 0:
        return torch.empty(dims, dtype=dtype)
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    t = torch.frombuffer(bytearray(msg.data), dtype=raw_dtype).reshape(dims)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    if finite and msg.dtype in FLOAT_NAMES and not bool(torch.isfinite(t).all()):
        raise MalformedMessage(f"{what}: contains NaN or infinite values")
    return t


def pack_mask(mask: torch.Tensor) -> pb.Tensor:
    """A boolean [B, L] mask as bits (eight positions per byte)."""
    m = mask.detach().to("cpu").bool().contiguous()
    return pb.Tensor(dtype=BITS, shape=list(m.shape), data=np.packbits(m.numpy()).tobytes())


def unpack_mask(msg: pb.Tensor, what: str, shape: Sequence[int]) -> torch.Tensor:
    """Decode a bit-packed mask of the given shape; padding bits must be zero."""
    if msg.dtype != BITS:
        raise MalformedMessage(f"{what}: dtype {msg.dtype} where bits is expected")
    if list(msg.shape) != list(shape):
        raise MalformedMessage(f"{what}: shape {list(msg.shape)} where {list(shape)} is expected")
    n = _numel(shape, what)
    if len(msg.data) != (n + 7) // 8:
        raise MalformedMessage(f"{what}: {len(msg.data)} bytes for {n} bits")
    bits = np.unpackbits(np.frombuffer(msg.data, dtype=np.uint8))
    if bits[n:].any():
        raise MalformedMessage(f"{what}: padding bits are set")
    return torch.from_numpy(bits[:n].astype(bool)).reshape(list(shape))
