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


def _policy(mode: str, keep: float, rescale: bool = True, seed: int = 0, norm="linf") -> Policy:
    return Policy(mode=mode, keep=keep, rescale=rescale, norm=norm, seed=seed)  # type: ignore[arg-type]


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
