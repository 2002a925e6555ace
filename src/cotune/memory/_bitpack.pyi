"""Type stub for the `_bitpack` C extension (`_bitpack.c`), the kernels behind
`cotune.memory.kernels`. The C functions take buffers: cotune passes C-contiguous numpy
arrays, and the functions write their results into arrays the caller allocates."""

from numpy import ndarray

def positive(keys: ndarray, n: int, width: int, hi: int, bits: ndarray, /) -> None: ...
def masked(src: ndarray, n: int, width: int, bits: ndarray, out: ndarray, /) -> None: ...
def set_simd(on: bool, /) -> bool: ...
def select_compress(
    keys: ndarray,
    b: int,
    n: int,
    width: int,
    absmask: int,
    thr: ndarray,
    valid: ndarray,
    rows: int,
    bits: ndarray,
    vals: ndarray,
    /,
) -> int: ...
def kth(
    keys: ndarray,
    b: int,
    n: int,
    width: int,
    absmask: int,
    probe: ndarray,
    s: int,
    valid: ndarray,
    rows: int,
    rank: int,
    out: ndarray,
    /,
) -> None: ...
def popcount(bits: ndarray, /) -> int: ...
def compress(src: ndarray, b: int, n: int, width: int, bits: ndarray, out: ndarray, /) -> int: ...
def expand(
    vals: ndarray,
    m: int,
    b: int,
    n: int,
    width: int,
    bits: ndarray,
    out: ndarray,
    /,
) -> None: ...
def overwrite(
    dst: ndarray,
    b: int,
    n: int,
    width: int,
    bits: ndarray,
    vals: ndarray,
    m: int,
    /,
) -> None: ...
