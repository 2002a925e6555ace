"""Sparse-saving autograd functions, one at a time: exact forward, gradients equal to
autograd's at keep = 1, unbiased random selection with rescale, bit packing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cotune.memory import pack_bits, token_mask, unpack_bits
from cotune.memory.kernels import _pack_bits_torch, _unpack_bits_torch
from cotune.memory.pack import Policy, pack, select_elems
from cotune.memory.swap import swap_in

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ["random", "norm", "backrazor"]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1000])
def test_bit_packing_round_trips(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(3, 2, n, generator=g) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 2, (n + 7) // 8)  # one bit per element
    assert torch.equal(unpack_bits(packed, n), mask)
    # the device-agnostic implementation agrees bit for bit
    assert torch.equal(_pack_bits_torch(mask), packed)
    assert torch.equal(_unpack_bits_torch(packed, n), mask)


def test_bit_order_is_lsb_first() -> None:
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert pack_bits(mask).tolist() == [1, 2]


def _policy(
    mode: str, keep: float, rescale: bool = True, seed: int = 0, norm="linf", keep_of="padded"
) -> Policy:
    return Policy(mode=mode, keep=keep, rescale=rescale, norm=norm, seed=seed, keep_of=keep_of)  # type: ignore[arg-type]


class _Block(nn.Module):
    """Linear -> GELU -> Linear -> LayerNorm, on (B, L, F) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.down = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(self.act(self.up(x))) + x)


def _grads(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * dy).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["input"] = x.grad.clone()
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)


@pytest.mark.parametrize("mode", MODES)
def test_block_forward_exact_and_keep_one_gradients_equal(mode: str) -> None:
    torch.manual_seed(0)
    dense = _Block()
    x, dy = _data()
    y_ref, g_ref = _grads(dense, x, dy)
    for keep in (1.0, 0.25):
        sparse = _Block()
        sparse.load_state_dict(dense.state_dict())
        swap_in(sparse, _policy(mode, keep))
        y, g = _grads(sparse, x, dy)
        assert torch.equal(y, y_ref)  # forward is exact in every mode
        if keep == 1.0:
            for name, ref in g_ref.items():
                torch.testing.assert_close(g[name], ref, rtol=1e-5, atol=1e-6, msg=name)
        else:  # really approximate, yet the biases' gradients need no activation
            assert not torch.allclose(g["up.weight"], g_ref["up.weight"], atol=1e-4)
            torch.testing.assert_close(g["norm.bias"], g_ref["norm.bias"])


def _weight_grad_draws(
    layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, draws: int
) -> tuple[torch.Tensor, float]:
    """Mean weight gradient over `draws` forward/backward passes, and the norm of its
    standard error (the distance to the truth an unbiased estimator stays within)."""
    grads = []
    for _ in range(draws):
        (layer(x) * dy).sum().backward()
        grads.append(layer.weight.grad.clone())
        layer.weight.grad = None
    stack = torch.stack(grads)
    std_err = stack.std(0) / draws**0.5
    return stack.mean(0), float(std_err.norm())


def _assert_unbiased(mean: torch.Tensor, std_err: float, dense: torch.Tensor) -> None:
    # ||mean - truth||^2 has expectation sum(SE^2) for an unbiased estimator
    assert float((mean - dense).norm()) < 2.0 * std_err


@pytest.mark.parametrize("make", [lambda: nn.Linear(8, 6), lambda: nn.LayerNorm(8)])
def test_random_rows_with_rescale_are_unbiased(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x, _ = _data(1)
    layer = make()
    out_features = layer(x).shape[-1]
    dy = torch.randn(2, 12, out_features, generator=torch.Generator().manual_seed(2))
    x.requires_grad_(True)
    (layer(x) * dy).sum().backward()
    dense = layer.weight.grad.clone()
    layer.weight.grad = None

    def run(rescale: bool) -> tuple[torch.Tensor, float]:
        sparse = make()
        sparse.load_state_dict(layer.state_dict())
        swap_in(sparse, _policy("random", 0.25, rescale=rescale, seed=3))
        return _weight_grad_draws(sparse, x, dy, draws=300)

    _assert_unbiased(*run(rescale=True), dense)
    mean, std_err = run(rescale=False)  # 1/4 of the rows without the 1/keep scale
    assert float((mean - dense).norm()) > 10 * std_err
    torch.testing.assert_close(mean * 4, dense, rtol=0.3, atol=0.3 * float(dense.abs().max()))


def test_random_rows_skip_padding_and_stay_unbiased() -> None:
    """With a token mask, padding rows are never kept and each real row has inclusion
    probability k / n_real, which the rescale undoes."""
    torch.manual_seed(0)
    x, _ = _data(4)
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, 6:] = False  # sample 1 has 6 real tokens
    layer = nn.Linear(8, 5)
    dy = torch.randn(2, 12, 5) * real.unsqueeze(-1)  # no gradient reaches padding
    (layer(x) * dy).sum().backward()
    dense = layer.weight.grad.clone()
    layer.weight.grad = None
    swap_in(layer, _policy("random", 0.25, seed=5))
    with token_mask(real):
        packed = pack(x, _policy("random", 0.25, seed=6))
        assert bool(real.gather(1, packed.index).all())  # k = 3 rows, all real
        mean, std_err = _weight_grad_draws(layer, x, dy, draws=300)
    _assert_unbiased(mean, std_err, dense)


@pytest.mark.parametrize("norm", ["linf", "l1", "l2"])
def test_norm_mode_keeps_the_largest_rows(norm: str) -> None:
    x = torch.randn(2, 10, 4)
    x[0, 3] *= 100
    x[1, 7] *= 100
    packed = pack(x, _policy("norm", 0.1, norm=norm))
    assert packed.meta.kind == "rows"
    assert packed.index.tolist() == [[3], [7]]
    assert torch.equal(packed.tensors[0][:, 0], x[[0, 1], [3, 7]])


def test_backrazor_keeps_per_sample_top_elements_with_a_bit_mask() -> None:
    x = torch.randn(3, 16, 8)
    packed = pack(x, _policy("backrazor", 0.25))
    values, bits = packed.tensors
    assert bits.dtype == torch.uint8 and bits.shape == (3, 16 * 8 // 8)
    mask = unpack_bits(bits, 16 * 8)
    assert mask.sum(1).tolist() == [32, 32, 32]  # exactly k per sample
    flat = x.reshape(3, -1).abs()
    for b in range(3):  # the kept elements are that sample's largest
        assert flat[b][mask[b]].min() >= flat[b][~mask[b]].max()
    assert torch.equal(values, x.reshape(3, -1)[mask])


def test_backrazor_threshold_on_large_samples_keeps_about_keep() -> None:
    """Above EXACT_TOPK_MAX elements per sample the k-th magnitude is estimated."""
    x = torch.randn(2, 128, 256, generator=torch.Generator().manual_seed(0))
    bits = select_elems(x, _policy("backrazor", 0.1))
    assert bits.dtype == torch.uint8 and bits.shape == (2, 128 * 256 // 8)
    mask = unpack_bits(bits, 128 * 256)
    share = mask.float().mean(1)
    # a quantile from 4096 draws: standard error sqrt(0.1 * 0.9 / 4096) = 0.0047
    assert torch.all((share - 0.1).abs() < 0.02), share
    flat = x.reshape(2, -1).abs()
    assert flat[0][mask[0]].min() >= flat[0][~mask[0]].max()


def _short_and_long() -> tuple[torch.Tensor, torch.Tensor]:
    """x (2, 20, 8): sample 0 has 6 real tokens of 20, sample 1 all 20."""
    x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(3))
    real = torch.ones(2, 20, dtype=torch.bool)
    real[0, 6:] = False
    return x, real


def test_norm_keep_of_padded_keeps_every_real_token_of_a_short_sample() -> None:
    """keep 0.5 of 20 rows is 10 slots: all 6 of sample 0's real rows (and 4 padding)."""
    x, real = _short_and_long()
    with token_mask(real):
        idx = pack(x, _policy("norm", 0.5)).index
    assert idx.shape == (2, 10)
    assert int(real[0, idx[0]].sum()) == 6


def test_norm_keep_of_real_keeps_a_share_of_each_samples_real_tokens() -> None:
    """keep_of = "real": ceil(0.5 * 6) = 3 real rows of sample 0, its 3 largest, the other
    7 slots on padding rows; sample 1 (no padding) is unchanged. The bytes stay 10 rows."""
    x, real = _short_and_long()
    with token_mask(real):
        packed = pack(x, _policy("norm", 0.5, keep_of="real"))
        padded = pack(x, _policy("norm", 0.5))
    idx = packed.index
    assert idx.shape == (2, 10) and packed.tensors[0].shape == (2, 10, 8)
    kept_real = sorted(int(i) for i in idx[0] if real[0, i])
    top3 = x[0, :6].abs().amax(-1).topk(3).indices.sort().values.tolist()
    assert kept_real == top3
    assert len(set(idx[0].tolist())) == 10  # distinct rows
    assert sorted(idx[1].tolist()) == sorted(padded.index[1].tolist())


def test_keep_of_real_weight_gradient_is_that_of_the_kept_real_rows() -> None:
    """The padding slots add nothing: dW equals the dense dW of x with only the kept real
    rows (padding rows get no output gradient, as in a masked model)."""

    class Masked(nn.Module):  # a model taking the mask, as swap_in's hooks expect
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    x, real = _short_and_long()
    dy = torch.randn(2, 20, 5) * real.unsqueeze(-1)
    model = Masked()
    policy = _policy("norm", 0.3, keep_of="real")
    with token_mask(real):
        idx = pack(x, policy).index
    swap_in(model, policy)
    (model(x, attention_mask=real.long()) * dy).sum().backward()
    layer = model.lin
    kept = torch.zeros(2, 20, dtype=torch.bool).scatter_(1, idx, True) & real
    assert kept.sum(1).tolist() == [2, 6]  # ceil(0.3 * 6), ceil(0.3 * 20)
    expected = dy.reshape(-1, 5).t() @ (x * kept.unsqueeze(-1)).reshape(-1, 8)
    torch.testing.assert_close(layer.weight.grad, expected)


def test_random_keep_of_real_rescales_by_the_real_share() -> None:
    x, real = _short_and_long()
    with token_mask(real):
        packed = pack(x, _policy("random", 0.5, keep_of="real"))
    # sample 0: 3 of 6 real rows kept -> weight 2; sample 1: 10 of 20 -> 2
    assert packed.tensors[2].tolist() == [2.0, 2.0]
    assert int(real[0, packed.index[0]].sum()) == 3


def test_backrazor_keep_of_real_keeps_a_share_of_each_samples_real_elements() -> None:
    x, real = _short_and_long()
    with token_mask(real):
        bits = select_elems(x, _policy("backrazor", 0.25, keep_of="real"))
        padded = select_elems(x, _policy("backrazor", 0.25))
    mask = unpack_bits(bits, 20 * 8).reshape(2, 20, 8)
    # ceil(0.25 * 6 * 8) = 12 of sample 0's real elements, none of its padding
    assert mask.sum((1, 2)).tolist() == [12, 40]
    assert not bool(mask[0, 6:].any())
    top = x[0, :6].abs().flatten().topk(12).values.min()
    assert float(x[0, :6][mask[0, :6]].abs().min()) >= float(top)
    # padded: 40 elements of sample 0 (all 48 real ones compete for them)
    assert int(unpack_bits(padded, 160)[0].sum()) == 40


def test_backrazor_keep_of_real_threshold_on_large_samples() -> None:
    """Above EXACT_TOPK_MAX the threshold is estimated on real elements only."""
    x = torch.randn(2, 128, 256, generator=torch.Generator().manual_seed(1))
    real = torch.ones(2, 128, dtype=torch.bool)
    real[0, 32:] = False  # a quarter of sample 0 is real
    with token_mask(real):
        mask = unpack_bits(select_elems(x, _policy("backrazor", 0.1, keep_of="real")), 128 * 256)
        padded = unpack_bits(select_elems(x, _policy("backrazor", 0.1)), 128 * 256)
    mask = mask.reshape(2, 128, 256)
    share_real = mask[0, :32].float().mean()
    assert abs(float(share_real) - 0.1) < 0.02, share_real
    assert not bool(mask[0, 32:].any())
    assert abs(float(mask[1].float().mean()) - 0.1) < 0.02
    # padded: about 0.1 of all 128 rows' elements, i.e. about 0.4 of the real ones
    share_padded = padded.reshape(2, 128, 256)[0, :32].float().mean()
    assert abs(float(share_padded) - 0.4) < 0.05, share_padded


def test_saved_tensors_shrink_with_keep() -> None:
    """What the Linear function saves: k rows of x and int16 row indices, nothing dense."""
    layer = nn.Linear(64, 64)
    swap_in(layer, _policy("norm", 0.25))
    x = torch.randn(4, 32, 64, requires_grad=True)
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer(x)
    shapes = sorted((tuple(t.shape), t.dtype) for t in saved if t is not layer.weight)
    assert shapes == [((4, 8), torch.int16), ((4, 8, 64), torch.float32)]


def test_autocast_keeps_rows_in_the_autocast_dtype() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    sparse = nn.Linear(16, 8)
    sparse.load_state_dict(dense.state_dict())
    swap_in(sparse, _policy("norm", 0.5))
    x = torch.randn(2, 10, 16)
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = dense(x)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            y = sparse(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    rows = [t for t in saved if t.dim() == 3]
    assert [(tuple(t.shape), t.dtype) for t in rows] == [((2, 5, 16), torch.bfloat16)]
    y.float().sum().backward()
    assert sparse.weight.grad is not None and sparse.weight.grad.dtype == torch.float32
