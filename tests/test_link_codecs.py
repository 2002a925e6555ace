"""Wire tensors and codecs: exact round trips where promised, bounded error where lossy,
and strict refusal of malformed payloads."""

from __future__ import annotations

import pytest
import torch

from cotune.config import LinkConfig, build_config
from cotune.errors import ConfigError
from cotune.link.codecs import FloatFormat, Int8Format, TopKFormat, make_codec
from cotune.link.errors import MalformedMessage
from cotune.link.pca import PcaProjection
from cotune.link.proto import pb
from cotune.link.wire import from_wire, pack_mask, to_wire, unpack_mask
from cotune.models.cut import SftFactors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int64]
)
def test_wire_round_trip_is_exact(dtype: torch.dtype) -> None:
    t = (torch.randn(5, 7) * 50).to(dtype)
    msg = pb.Tensor.FromString(to_wire(t).SerializeToString())
    back = from_wire(msg, "t")
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    assert len(msg.data) == t.numel() * t.element_size()


def test_wire_refuses_malformed_tensors() -> None:
    good = to_wire(torch.randn(4, 3))
    with pytest.raises(MalformedMessage, match="shape"):
        from_wire(good, "x", shape=(4, 2))
    with pytest.raises(MalformedMessage, match="dtype"):
        from_wire(good, "x", dtypes=("float16",))
    short = pb.Tensor(dtype="float32", shape=[4, 3], data=good.data[:-4])
    with pytest.raises(MalformedMessage, match="data bytes"):
        from_wire(short, "x")
    with pytest.raises(MalformedMessage, match="unknown dtype"):
        from_wire(pb.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), "x")
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(MalformedMessage, match="NaN"):
        from_wire(to_wire(bad), "x")
    with pytest.raises(MalformedMessage, match="elements"):
        from_wire(pb.Tensor(dtype="float32", shape=[1 << 20, 1 << 20], data=b""), "x")


def test_mask_bits_round_trip_and_validation() -> None:
    mask = torch.rand(3, 11) > 0.4
    msg = pack_mask(mask)
    assert len(msg.data) == (33 + 7) // 8
    assert torch.equal(unpack_mask(msg, "m", (3, 11)), mask)
    with pytest.raises(MalformedMessage):
        unpack_mask(msg, "m", (3, 10))
    tampered = pb.Tensor(dtype="bits", shape=[3, 11], data=msg.data[:-1] + b"\xff")
    with pytest.raises(MalformedMessage, match="padding bits"):
        unpack_mask(tampered, "m", (3, 11))


def _round(fmt, x: torch.Tensor) -> tuple[torch.Tensor, pb.Encoded]:  # type: ignore[no-untyped-def]
    msg = pb.Encoded.FromString(fmt.encode(x).SerializeToString())
    return fmt.decode(msg, "x", *x.shape), msg


def test_float_formats() -> None:
    x = torch.randn(20, 16)
    y, msg = _round(FloatFormat("fp32"), x)
    assert torch.equal(x, y) and len(msg.parts["values"].data) == 20 * 16 * 4
    for name, eps in (("fp16", 2**-11), ("bf16", 2**-8)):
        y, msg = _round(FloatFormat(name), x)
        assert len(msg.parts["values"].data) == 20 * 16 * 2
        assert ((y - x).abs() <= eps * x.abs() + 1e-7).all()


def test_int8_per_token_scale() -> None:
    x = torch.randn(10, 32) * torch.logspace(-3, 3, 10).unsqueeze(1)  # very different rows
    y, msg = _round(Int8Format(), x)
    scales = x.abs().amax(1) / 127
    assert ((y - x).abs() <= scales.unsqueeze(1) / 2 + 1e-9).all()
    assert len(msg.parts["values"].data) == 10 * 32 and len(msg.parts["scales"].data) == 10 * 4
    zero, _ = _round(Int8Format(), torch.zeros(2, 4))
    assert torch.equal(zero, torch.zeros(2, 4))


def test_topk_keeps_largest_and_validates_indices() -> None:
    x = torch.randn(6, 40)
    fmt = TopKFormat(0.1)
    y, msg = _round(fmt, x)
    k = 4
    assert (y != 0).sum(1).eq(k).all()
    top = x.abs().topk(k, dim=1).indices
    assert torch.equal(y.gather(1, top), x.gather(1, top))
    assert (
        len(msg.parts["values"].data) == 6 * k * 4 and len(msg.parts["indices"].data) == 6 * k * 2
    )
    msg.parts["indices"].CopyFrom(to_wire(torch.full((6, k), 40, dtype=torch.int16)))
    with pytest.raises(MalformedMessage, match="outside"):
        fmt.decode(msg, "x", 6, 40)


def test_decode_checks_format_and_shape() -> None:
    msg = FloatFormat("fp16").encode(torch.randn(3, 4))
    with pytest.raises(MalformedMessage, match="format"):
        FloatFormat("fp32").decode(msg, "x", 3, 4)
    with pytest.raises(MalformedMessage, match="shape"):
        FloatFormat("fp16").decode(msg, "x", 3, 5)


def test_codec_families_match_both_ways() -> None:
    for name in ("identity", "fp16", "bf16", "int8", "topk", "pca", "sft"):
        codec = make_codec(LinkConfig(codec=name, rank=8))
        assert type(codec.forward) is type(codec.backward)
    assert make_codec(LinkConfig(codec="pca", rank=5)).projection_rank == 5
    assert make_codec(LinkConfig(codec="sft", rank=5)).sft_rank == 5
    sft8 = make_codec(LinkConfig(codec="sft", rank=5, code_format="int8"))
    assert isinstance(sft8.forward, Int8Format) and isinstance(sft8.backward, Int8Format)
    assert sft8.top_forward.name == "fp32"  # pooled features have no bottleneck


def test_code_format_is_only_for_bottleneck_codecs() -> None:
    with pytest.raises(ConfigError, match="code_format applies to .* 'pca' and 'sft'"):
        build_config({"link": {"codec": "identity", "code_format": "int8"}})
    assert (
        build_config({"link": {"codec": "pca", "code_format": "fp16"}}).link.code_format == "fp16"
    )


def test_pca_keeps_low_rank_data_and_projects_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
    data = torch.randn(200, 4, generator=g) @ basis.T + 3.0  # rank 4 around a mean
    pca = PcaProjection(32, 4)
    pca.calibrate(data)
    torch.testing.assert_close(pca.reconstruct(pca.project(data)), data, rtol=1e-4, atol=1e-4)
    other = PcaProjection(32, 4)
    other.load_state(
        {k: pb.Tensor.FromString(v.SerializeToString()) for k, v in pca.state().items()}
    )
    h = torch.randn(5, 32, requires_grad=True)
    code = other.project(h)
    assert code.shape == (5, 4)
    upstream = torch.randn(5, 4)
    code.backward(upstream)
    torch.testing.assert_close(h.grad, upstream @ other.basis.T)
    bad = pca.state()
    bad["basis"] = to_wire(torch.ones(32, 4))
    with pytest.raises(MalformedMessage, match="orthonormal"):
        other.load_state(bad)


def test_sft_factors_are_the_truncated_svd() -> None:
    w = torch.randn(48, 16)
    b = torch.randn(48)
    full = SftFactors(w, b, 16)
    z = torch.randn(7, 16)
    torch.testing.assert_close(full.decode(full.encode(z)), z @ w.T + b, rtol=1e-4, atol=1e-4)
    r = 4
    low = SftFactors(w, b, r)
    assert low.encode(z).shape == (7, r)
    approx = low.U @ torch.diag(low.S) @ low.V
    s = torch.linalg.svdvals(w)
    # Eckart-Young: the spectral error of the best rank-r approximation is s[r]
    torch.testing.assert_close(
        torch.linalg.matrix_norm(w - approx, ord=2), s[r], rtol=1e-4, atol=1e-5
    )
