"""The numba kernels behind `cotune.memory.kernels`, imported on first use (importing
numba costs about a quarter of a second, which runs without `[memory]` should not pay).

Every kernel walks a sample's bits a byte at a time with a fixed 8-step inner loop (which
numba unrolls: about twice as fast as one flat loop with a bit counter) and is branch-free
on the data: a value is always written, and the write position only advances when the bit
is set. Arrays are signed-integer views of the tensors' bit patterns (see kernels.py).
"""

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)


@_jit
def select_compress_aligned(keys, absmask, thr, valid, f, vals, bits):
    # rows of f elements, f a multiple of 8: a byte never straddles two rows
    b_n, n = keys.shape
    rows = valid.shape[1]
    row_bytes = f >> 3
    never = np.int64(0x7FFFFFFFFFFFFFFF)  # above every magnitude key
    pos = 0
    for b in range(b_n):
        j = 0
        for r in range(rows):
            t = thr[b] if valid[b, r] != 0 else never
            for _ in range(row_bytes):
                acc = 0
                for bit in range(8):
                    v = keys[b, j * 8 + bit]
                    k = np.int64((v & absmask) > t)
                    vals[pos] = v
                    pos += k
                    acc |= k << bit
                bits[b, j] = acc
                j += 1
    return pos


@_jit
def select_compress_any(keys, absmask, thr, valid, f, vals, bits):
    b_n, n = keys.shape
    rows = valid.shape[1]
    never = np.int64(0x7FFFFFFFFFFFFFFF)  # above every magnitude key
    pos = 0
    for b in range(b_n):
        r = 0
        c = 0
        t = thr[b] if valid[b, 0] != 0 else never
        for j in range((n + 7) >> 3):
            acc = 0
            for bit in range(8):
                i = j * 8 + bit
                if i < n:
                    v = keys[b, i]
                    k = np.int64((v & absmask) > t)
                    vals[pos] = v
                    pos += k
                    acc |= k << bit
                    c += 1
                    if c == f:
                        c = 0
                        r += 1
                        if r < rows:
                            t = thr[b] if valid[b, r] != 0 else never
            bits[b, j] = acc
    return pos


@_jit
def compress(src, bits, out):
    b_n, n = src.shape
    full = n >> 3
    pos = 0
    for b in range(b_n):
        for j in range(full):
            byte = bits[b, j]
            for bit in range(8):
                out[pos] = src[b, j * 8 + bit]
                pos += (byte >> bit) & 1
        for i in range(full * 8, n):
            out[pos] = src[b, i]
            pos += (bits[b, full] >> (i - full * 8)) & 1
    return pos


@_jit
def expand(vals, bits, out):
    b_n, n = out.shape
    m = vals.shape[0]
    if m == 0:
        out[:] = 0
        return
    full = n >> 3
    pos = 0
    for b in range(b_n):
        for j in range(full):
            byte = bits[b, j]
            for bit in range(8):
                k = (byte >> bit) & 1
                out[b, j * 8 + bit] = vals[min(pos, m - 1)] * k
                pos += k
        for i in range(full * 8, n):
            k = (bits[b, full] >> (i - full * 8)) & 1
            out[b, i] = vals[min(pos, m - 1)] * k
            pos += k


@_jit
def overwrite(dst, bits, vals):
    b_n, n = dst.shape
    m = vals.shape[0]
    if m == 0:
        return
    full = n >> 3
    pos = 0
    for b in range(b_n):
        for j in range(full):
            byte = bits[b, j]
            for bit in range(8):
                k = np.int64((byte >> bit) & 1)
                o = dst[b, j * 8 + bit]
                dst[b, j * 8 + bit] = o ^ ((o ^ vals[min(pos, m - 1)]) & -k)
                pos += k
        for i in range(full * 8, n):
            k = np.int64((bits[b, full] >> (i - full * 8)) & 1)
            o = dst[b, i]
            dst[b, i] = o ^ ((o ^ vals[min(pos, m - 1)]) & -k)
            pos += k
