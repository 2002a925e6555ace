"""The backrazor kernels (select + compress, compress, expand, overwrite), both the C
extension and its numpy fallback, against plain torch; the attention backward that uses
them against its documented formulas."""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest
import torch

from cotune.memory import kernels, pack_bits
from cotune.memory.activation import dropout_keep, dropout_mask
from cotune.memory.attention import (
    SparseAttentionFunction,
    _attention_backward,
)
from cotune.memory.pack import Policy, Sparse, pack, pack_positive

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, rows, F): F a multiple of 8 (the byte-aligned kernel) or not; n % 8 != 0 (a tail)
SHAPES = [(3, 4, 16), (2, 5, 13), (2, 3, 7), (1, 1, 5), (2, 9, 40), (3, 7, 29)]


@pytest.fixture(params=["simd", "portable", "numpy"])
def backend(request, monkeypatch):  # type: ignore[no-untyped-def]
    """The C extension with its AVX2 loops (where the CPU has AVX2), the C extension's
    portable loops, and the numpy fallback."""
    compiled = request.param != "numpy"
    if compiled and not kernels.COMPILED:  # make setup builds it (a C compiler is there)
        pytest.fail("cotune.memory._bitpack is not built: install a C compiler, re-run make setup")
    monkeypatch.setattr(kernels, "COMPILED", compiled)
    if compiled:
        kernels.set_simd(request.param == "simd")
        yield request.param
        kernels.set_simd(True)
    else:
        yield request.param


def _reference_mask(x, thr, valid):  # type: ignore[no-untyped-def]
    b, rows, f = x.shape
    mask = x.abs().reshape(b, -1) > thr.to(x.dtype).unsqueeze(1)
    keep_all = (thr < 0).unsqueeze(1)
    mask |= keep_all
    if valid is not None:
        mask &= valid.repeat_interleave(f, dim=1)
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("expect", [1.0, 0.0], ids=["room", "overflow"])
def test_select_compress_matches_torch(backend, dtype, shape, with_valid, expect) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    x[0, 0, 0] = 0.0
    x[-1, -1, -1] = -0.0  # signed zero: its magnitude is 0
    b, rows, _ = shape
    thr = torch.rand(b, generator=g) * 1.5
    thr[0] = -0.5  # keep every valid element
    valid = torch.rand(b, rows, generator=g) < 0.6 if with_valid else None
    keys = torch.from_numpy(kernels.threshold_key(thr, dtype))
    values, bits = kernels.select_compress(x, keys, valid, expect)
    mask = _reference_mask(x, thr, valid)
    assert bits.dtype == torch.uint8 and torch.equal(bits, pack_bits(mask))
    assert values.dtype == dtype
    # bit for bit (torch.equal alone would take -0.0 for 0.0)
    want = x.reshape(b, -1)[mask]
    assert (kernels.int_view(values) == kernels.int_view(want)).all()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bool, torch.uint8], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compress_expand_overwrite_round_trip(backend, dtype, shape) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(7 + sum(shape))
    b = shape[0]
    src = (torch.randn(shape, generator=g) * 4).to(dtype)
    mask = torch.rand(b, shape[1] * shape[2], generator=g) < 0.3
    mask[0] = False  # an empty sample
    bits = pack_bits(mask)
    kept = kernels.compress(src, bits)
    assert torch.equal(kept, src.reshape(b, -1)[mask])
    dense = kernels.expand(kept, bits, shape)
    assert dense.shape == shape and dense.dtype == dtype
    assert torch.equal(dense.reshape(b, -1), torch.where(mask, src.reshape(b, -1), 0).to(dtype))
    base = (torch.randn(shape, generator=g) * 4).to(dtype)
    out = kernels.overwrite(base.clone(), bits, kept)
    assert torch.equal(
        out.reshape(b, -1), torch.where(mask, src.reshape(b, -1), base.reshape(b, -1))
    )


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize("with_valid", [False, True])
def test_threshold_keys_are_the_kth_probed_magnitude(backend, dtype, with_valid) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(5)
    b, rows, f, s = 3, 6, 10, 200
    x = torch.randn(b, rows, f, generator=g).to(dtype)
    valid = torch.rand(b, rows, generator=g) < 0.5 if with_valid else None
    probe = torch.randint(rows * f, (b, s), generator=g)
    for rank in (0, 57, 180, s - 1):
        got = kernels.threshold_keys(x, probe, valid, rank)
        mags = x.reshape(b, -1).abs().float().gather(1, probe)
        if valid is not None:
            mags = mags.masked_fill(~valid.gather(1, probe // f), -1.0)
        want_float = mags.kthvalue(rank + 1, dim=1).values
        assert torch.equal(got, torch.from_numpy(kernels.threshold_key(want_float, dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 8, 61, 200])
def test_positive_bits_and_masked_match_torch(backend, dtype, n) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan")]
    x[: min(n, len(specials))] = torch.tensor(specials[: min(n, len(specials))], dtype=dtype)
    x = x.reshape(1, n) if n % 2 else x.reshape(-1, 2).t()  # 2-D; sometimes not contiguous
    bits = kernels.positive_bits(x)
    assert torch.equal(bits, pack_bits((x > 0).reshape(-1)))
    src = torch.randn(x.shape, generator=g).to(dtype)
    out = kernels.masked(src, bits)
    want = torch.where(x > 0, src, torch.zeros((), dtype=dtype))
    assert out.shape == x.shape and out.dtype == dtype
    assert (kernels.int_view(out) == kernels.int_view(want)).all()  # +0 where masked


def test_simd_is_used_where_the_cpu_has_avx2() -> None:
    if not kernels.COMPILED:
        pytest.fail("cotune.memory._bitpack is not built: install a C compiler, re-run make setup")
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    has_avx2 = "avx2" in flags and platform.machine() in ("x86_64", "AMD64")
    assert kernels.set_simd(True) == has_avx2
    assert kernels.set_simd(False) is False
    assert kernels.set_simd(True) == has_avx2


def test_expand_of_nothing_is_zeros(backend) -> None:  # type: ignore[no-untyped-def]
    bits = pack_bits(torch.zeros(2, 20, dtype=torch.bool))
    out = kernels.expand(torch.empty(0), bits, (2, 4, 5))
    assert torch.equal(out, torch.zeros(2, 4, 5))


@pytest.mark.parametrize("mode", ["random", "norm", "backrazor"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_attention_backward_follows_the_formulas(mode: str, p: float) -> None:
    """At keep < 1, with and without dropout: the gradients equal the documented formulas
    evaluated on the zero-filled reconstructions of what was saved."""
    b, h, seq, d, scale = 2, 2, 96, 16, 0.25  # P has 18,432 elements per sample: sampled
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, seq, d, generator=g, requires_grad=True) for _ in range(3))
    d_out = torch.randn(b, seq, h, d, generator=g)

    torch.manual_seed(11)
    out = SparseAttentionFunction.apply(q, k, v, None, scale, p, Policy(mode, 0.3))  # type: ignore[arg-type]
    out.backward(d_out)

    policy = Policy(mode, 0.3)  # type: ignore[arg-type]  # same seed: same selections
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    torch.manual_seed(11)
    probs = torch.softmax(qd @ kd.transpose(2, 3) * scale, dim=-1)
    keep = dropout_mask(probs, p) / (1 - p) if p > 0 else torch.ones_like(probs)
    sq, sk, sv, sp = (
        Sparse(x.meta, tuple(x.tensors)) for x in (pack(t, policy) for t in (qd, kd, vd, probs))
    )
    p_hat = sp.dense()
    row_scale = sp.row_scale()
    rs = 1.0 if row_scale is None else row_scale
    d_o = d_out.transpose(1, 2)
    d_v = (sp.dense(scaled=True) * keep).transpose(2, 3) @ d_o
    d_pd = d_o @ sv.dense(scaled=True).transpose(2, 3)
    d_s = p_hat * (d_pd * keep - (d_pd * keep * p_hat).sum(-1, keepdim=True)) * rs * scale
    d_q = d_s @ sk.dense(scaled=True)
    d_k = d_s.transpose(2, 3) @ sq.dense(scaled=True)
    assert out.shape == (b, seq, h, d)
    for got, want in ((q.grad, d_q), (k.grad, d_k), (v.grad, d_v)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    # and a dropped share really is missing: not the dense gradient
    dense_dv = (probs * keep).transpose(2, 3) @ d_o
    assert not torch.allclose(v.grad, dense_dv, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("shape", [(4, 3, 64, 64), (7, 5), (1001,)])
def test_dropout_keep_draws_what_the_float_mask_draws(shape: tuple[int, ...]) -> None:
    """The bool mask the sparse attention draws is eager's float mask, and the generator
    is left in the same state (later draws agree too)."""
    x = torch.randn(shape)
    torch.manual_seed(5)
    floats, after_floats = dropout_mask(x, 0.1), torch.rand(4)
    torch.manual_seed(5)
    bools, after_bools = dropout_keep(x, 0.1), torch.rand(4)
    assert bools.dtype == torch.bool and torch.equal(floats.bool(), bools)
    assert torch.equal(after_floats, after_bools)
    assert 0.8 < bools.float().mean() < 1.0 or x.numel() < 100


@pytest.mark.parametrize("mode", ["random", "norm"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_backward_on_kept_rows_equals_the_zero_filled_one(
    mode: str, p: float, kv_heads: int
) -> None:
    """With P saved as kept query rows, the backward computed on those rows only gives
    the gradients of the zero-filled (B, H, L, L) computation, grouped heads included."""
    b, h, seq, d = 2, 4, 40, 8
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, seq, d, generator=g)
    k, v = (torch.randn(b, kv_heads, seq, d, generator=g) for _ in range(2))
    d_o = torch.randn(b, h, seq, d, generator=g)
    n_rep = h // kv_heads
    policy = Policy(mode, 0.3)  # type: ignore[arg-type]
    probs = torch.softmax(q @ k.repeat_interleave(n_rep, 1).transpose(2, 3) * 0.3, dim=-1)
    packs = [pack(t, policy) for t in (q, k, v, probs)]
    assert packs[3].meta.kind == "rows"
    sq, sk, sv, sp = (Sparse(x.meta, tuple(x.tensors)) for x in packs)
    st = None
    if p > 0:
        keep = dropout_mask(probs, p)
        bits = pack_positive(packs[3].select(keep))  # the mask where P is kept, as bits
        st = Sparse(bits.meta, tuple(bits.tensors))
    got = _attention_backward(sp, sq, sk, sv, st, d_o, n_rep, 0.3, p, kept_rows=True)
    want = _attention_backward(sp, sq, sk, sv, st, d_o, n_rep, 0.3, p, kept_rows=False)
    for name, a, w in zip("qkv", got, want, strict=True):
        assert a.shape == w.shape, name
        assert torch.allclose(a, w, rtol=1e-5, atol=1e-6), name
        assert a.abs().sum() > 0, name


def test_the_extension_checks_its_buffers_and_stays_inside_them() -> None:
    if not kernels.COMPILED:
        pytest.fail("cotune.memory._bitpack is not built: install a C compiler, re-run make setup")
    from cotune.memory import _bitpack

    g = np.random.default_rng(0)
    src = g.integers(-100, 100, size=(2, 37), dtype=np.int32)
    mask = g.random((2, 37)) < 0.5
    bits = np.packbits(mask, axis=-1, bitorder="little")
    count = int(mask.sum())
    assert _bitpack.popcount(bits) == count
    guarded = np.full(count + 3, 12345, dtype=np.int32)
    short = guarded[: count - 2]  # two too few: the tail must stay untouched
    assert _bitpack.compress(src, 2, 37, 4, bits, short) == count
    assert (short == src[mask][: count - 2]).all() and (guarded[count - 2 :] == 12345).all()
    with pytest.raises(ValueError, match="width"):
        _bitpack.compress(src, 2, 37, 3, bits, guarded)
    with pytest.raises(ValueError, match="src"):
        _bitpack.compress(src, 3, 37, 4, bits, guarded)  # claims more rows than src has
    with pytest.raises(ValueError, match="rows must divide"):
        _bitpack.select_compress(
            src, 2, 37, 4, 0x7FFFFFFF, np.zeros(2, np.int64), np.ones((2, 5), np.uint8), 5,
            bits, guarded,
        )  # fmt: skip
