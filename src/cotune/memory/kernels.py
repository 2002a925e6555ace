"""Element-level kernels for backrazor packs: select + compress in one pass, expand, and
compress / overwrite with an existing bit mask.

A backrazor pack is a per-sample bit mask (B, ceil(n / 8)) uint8, LSB first, plus the kept
values in mask order (row-major over (B, n)). Building it with torch or numpy takes one
memory pass per step (abs, compare, compress, pack the bits; then zeros and place to
rebuild): on a CPU those passes cost more than the matmuls they feed. The kernels here
do each job in a single branch-free pass, in a small C extension (`_bitpack.c`, built by
`pip install`), with AVX2 loops for 4-byte elements (float32) picked at run time on CPUs
that have it (eight elements per mask byte; bit-identical to the portable loops).

They work on the tensors' bit patterns viewed as signed integers of the same width
(float32 -> int32, float16 / bfloat16 -> int16, float64 -> int64, bool -> int8), so one
kernel serves every float dtype, bfloat16 included, and values are copied bit for bit. The magnitude of a float is its bit pattern with the sign
bit cleared, and for non-negative floats the integer order of the bit patterns is the
numeric order, so "|x| > threshold" is an integer comparison.

Where the extension could not be built (no C compiler at install time) every function
falls back to numpy with the same results, 2x to 5x slower; tensors on other devices use
torch ops. `tests/test_memory_kernels.py` checks that all paths agree.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the extension's stub (_bitpack.pyi); every use is behind COMPILED
    from cotune.memory import _bitpack
else:
    try:
        from cotune.memory import _bitpack
    except ImportError:  # pragma: no cover - the extension is optional at install time
        _bitpack = None

COMPILED = _bitpack is not None

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view(t: torch.Tensor) -> np.ndarray:
    """t's bit patterns as a numpy array of signed integers of the same width (no copy
    when t is contiguous)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.view(_INT_VIEW[t.element_size()]).numpy()


def _from_int(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    if dtype == torch.bool:
        return t.view(torch.uint8).view(torch.bool)
    return t.view(dtype)


def abs_mask(dtype: torch.dtype) -> int:
    """The bit pattern with every bit but the sign bit set, for a float dtype."""
    return (1 << (torch.finfo(dtype).bits - 1)) - 1


def threshold_key(threshold: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Per-sample thresholds (B,) (non-negative magnitudes in `dtype`, or negative for
    "keep every valid element") as int64 keys comparable with `int_view(x) & abs_mask`."""
    t = threshold.detach().to(dtype).contiguous()
    keys = t.view(_INT_VIEW[t.element_size()]).numpy().astype(np.int64) & abs_mask(dtype)
    return np.where(threshold.detach().cpu().numpy() < 0, -1, keys).astype(np.int64)


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor's last dimension into bytes (LSB first) in torch ops (any device)."""
    n = mask.shape[-1]
    pad = (-n) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], pad)], dim=-1)
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    return (bits << _SHIFTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def _unpack_bits_torch(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()


def _unpack(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits, axis=-1, count=n, bitorder="little").view(np.bool_)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor's last dimension into bytes (8 elements per uint8, LSB first)."""
    if mask.device.type == "cpu":
        packed = np.packbits(mask.contiguous().numpy(), axis=-1, bitorder="little")
        return torch.from_numpy(packed)
    return _pack_bits_torch(mask)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `n` bits of each row as a bool tensor."""
    if packed.device.type == "cpu":
        return torch.from_numpy(_unpack(packed.numpy(), n))
    return _unpack_bits_torch(packed, n)


def threshold_keys(
    x: torch.Tensor, probe: torch.Tensor, valid: torch.Tensor | None, rank: int
) -> torch.Tensor:
    """Per sample b, the rank-th smallest (0-based) magnitude key among the elements of x
    (B, ...) at `probe[b]` (B, S) int64, elements of invalid rows counting as -1: an int64
    tensor (B,) for `select_compress` (-1 keeps every valid element)."""
    b = x.shape[0]
    n = x[0].numel() if b else 0
    rows = 1 if valid is None else valid.shape[1]
    absmask = abs_mask(x.dtype)
    if x.device.type != "cpu":
        keys_t = _key_tensor(x).reshape(b, n).gather(1, probe).long() & absmask
        if valid is not None:
            keys_t = keys_t.masked_fill(~valid.gather(1, probe // (n // rows)), -1)
        return keys_t.kthvalue(rank + 1, dim=1).values
    keys = int_view(x).reshape(b, n)
    valid_np = _valid_array(valid, b)
    probe_np = probe.contiguous().numpy()
    if COMPILED:
        out = np.empty(b, dtype=np.int64)
        _bitpack.kth(
            keys, b, n, keys.itemsize, absmask, probe_np, probe_np.shape[1], valid_np, rows,
            rank, out,
        )  # fmt: skip
        return torch.from_numpy(out)
    sample = keys[np.arange(b)[:, None], probe_np].astype(np.int64) & absmask
    sample[~valid_np.astype(bool)[np.arange(b)[:, None], probe_np // (n // rows)]] = -1
    return torch.from_numpy(np.partition(sample, rank, axis=1)[:, rank].copy())


def _key_tensor(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().view(_INT_VIEW[x.element_size()])


def _valid_array(valid: torch.Tensor | None, b: int) -> np.ndarray:
    if valid is None:
        return np.ones((b, 1), np.uint8)
    return np.ascontiguousarray(valid.numpy()).view(np.uint8)


def select_compress(
    x: torch.Tensor, thr: torch.Tensor, valid: torch.Tensor | None, expect: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per sample b, the elements of x (B, ...) whose magnitude key exceeds thr[b]
    (int64 (B,), see `threshold_keys`; -1 keeps all) and, with `valid` (B, R) bool, that
    lie in valid rows of F = n / R elements each. Returns the kept values (1-D, mask
    order, x's dtype) and the bit mask (B, ceil(n / 8)) uint8.

    `expect` is an upper estimate of the kept share: the values are written in the same
    pass into an array of that size, trimmed in place afterwards (and, should more be
    kept, compressed again into an exact-size one)."""
    b = x.shape[0]
    n = x[0].numel() if b else 0
    rows = 1 if valid is None else valid.shape[1]
    assert n % rows == 0, "valid rows must tile each sample"
    absmask = abs_mask(x.dtype)
    if x.device.type != "cpu":
        flat = x.detach().reshape(b, n)
        mask_t = (_key_tensor(x).reshape(b, n).long() & absmask) > thr.to(x.device).unsqueeze(1)
        if valid is not None:
            mask_t &= valid.repeat_interleave(n // rows, dim=1)
        return flat[mask_t], _pack_bits_torch(mask_t)
    keys = int_view(x).reshape(b, n)
    thr_np = thr.contiguous().numpy()
    valid_np = _valid_array(valid, b)
    if COMPILED:
        bits = np.empty((b, math.ceil(n / 8)), dtype=np.uint8)
        w = keys.itemsize
        cap = min(b * n, math.ceil(expect * b * n) + 8)
        vals = np.empty(cap, dtype=keys.dtype)
        count = _bitpack.select_compress(keys, b, n, w, absmask, thr_np, valid_np, rows, bits, vals)
        if count <= cap:
            vals.resize(count, refcheck=False)  # realloc: shrinks in place
        else:
            vals = np.empty(count, dtype=keys.dtype)
            _bitpack.compress(keys, b, n, w, bits, vals)
        return _from_int(vals, x.dtype), torch.from_numpy(bits)
    mask = (keys.astype(np.int64) & absmask) > thr_np[:, None]
    mask &= np.repeat(valid_np.astype(bool), n // rows, axis=1)
    vals = np.compress(mask.ravel(), keys.ravel())
    bits = np.packbits(mask, axis=-1, bitorder="little")
    return _from_int(vals, x.dtype), torch.from_numpy(bits)


def compress(src: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The elements of src (B, ...) at the set bits of `bits` (B, ceil(n / 8)), 1-D in
    mask order."""
    b = bits.shape[0]
    if src.device.type != "cpu":
        flat = src.detach().reshape(b, -1)
        return flat[_unpack_bits_torch(bits, flat.shape[1])]
    keys = int_view(src).reshape(b, -1)
    bits_np = bits.numpy()
    if COMPILED:
        out = np.empty(_bitpack.popcount(bits_np), dtype=keys.dtype)
        _bitpack.compress(keys, b, keys.shape[1], keys.itemsize, bits_np, out)
        return _from_int(out, src.dtype)
    mask = _unpack(bits_np, keys.shape[1])
    return _from_int(np.compress(mask.ravel(), keys.ravel()), src.dtype)


def expand(vals: torch.Tensor, bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `compress`: zeros of `shape` with `vals` at the set bits, in mask order."""
    b = shape[0]
    n = math.prod(shape[1:])
    if vals.device.type != "cpu":
        mask = _unpack_bits_torch(bits, n)
        return vals.new_zeros((b, n)).masked_scatter_(mask, vals.detach()).reshape(shape)
    keys = int_view(vals).reshape(-1)
    bits_np = bits.numpy()
    if COMPILED:
        out = np.empty((b, n), dtype=keys.dtype)
        _bitpack.expand(keys, keys.size, b, n, keys.itemsize, bits_np, out)
    else:
        out = np.zeros((b, n), dtype=keys.dtype)
        np.place(out, _unpack(bits_np, n), keys)
    return _from_int(out, vals.dtype).reshape(shape)


def overwrite(dst: torch.Tensor, bits: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """dst (contiguous, CPU) with `vals` written at the set bits, in mask order, in place."""
    assert dst.is_contiguous() and dst.dtype == vals.dtype
    b = bits.shape[0]
    if dst.device.type != "cpu":
        mask = _unpack_bits_torch(bits, dst[0].numel()).reshape(dst.shape)
        return dst.masked_scatter_(mask, vals)
    view = int_view(dst).reshape(b, -1)
    keys = int_view(vals).reshape(-1)
    if COMPILED:
        _bitpack.overwrite(view, b, view.shape[1], view.itemsize, bits.numpy(), keys, keys.size)
    else:
        np.place(view, _unpack(bits.numpy(), view.shape[1]), keys)
    return dst


@functools.cache
def _posinf_key(dtype: torch.dtype) -> int:
    inf = torch.tensor(float("inf"), dtype=dtype)
    return int(inf.view(_INT_VIEW[inf.element_size()]).item())


def positive_bits(x: torch.Tensor) -> torch.Tensor:
    """`pack_bits((x > 0).reshape(-1))` in one pass: the bits (ceil(n / 8),) uint8 of the
    positive elements of a float tensor, flattened."""
    if x.device.type != "cpu" or not COMPILED or not x.is_floating_point():
        return pack_bits((x > 0).reshape(-1))
    keys = int_view(x).reshape(-1)
    bits = np.empty(math.ceil(keys.size / 8), dtype=np.uint8)
    _bitpack.positive(keys, keys.size, keys.itemsize, _posinf_key(x.dtype), bits)
    return torch.from_numpy(bits)


def masked(src: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """src where the bits (ceil(n / 8),) uint8 of its flattened elements are set, +0
    elsewhere (a new tensor of src's shape and dtype)."""
    if src.device.type != "cpu" or not COMPILED:
        keep = _unpack_bits_torch(bits.to(src.device), src.numel()).reshape(src.shape)
        return torch.where(keep, src, torch.zeros((), dtype=src.dtype, device=src.device))
    keys = int_view(src).reshape(-1)
    out = np.empty_like(keys)
    _bitpack.masked(keys, keys.size, keys.itemsize, bits.contiguous().numpy(), out)
    return _from_int(out, src.dtype).reshape(src.shape)


def set_simd(on: bool) -> bool:
    """Use the AVX2 loops (where the CPU has them) or force the portable ones; returns
    whether the AVX2 loops are now in use. For tests and benchmarks."""
    return bool(_bitpack.set_simd(on)) if COMPILED else False
