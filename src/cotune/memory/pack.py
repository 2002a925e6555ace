"""Compact storage of a tensor saved for backward.

A saved activation of shape `(..., L, F)` has `L` token rows (the contraction dimension
of the weight gradients) of `F` features each. Three representations:

- `dense`: the tensor itself (mode `none`, or `keep = 1`).
- `rows` (modes `random` and `norm`): `k = ceil(keep * L)` token rows per leading slice
  (per sample, or per sample and head), as the kept rows' values `(..., k, F)` and their
  row indices `(..., k)` (int16 when `L` fits). `random` draws the rows uniformly among
  the sample's real (non-padding) tokens; `norm` takes the rows of largest L-inf, L1 or
  L2 norm. With `rescale`, each kept row carries `1 / P(kept)`, so the zero-filled
  reconstruction is an unbiased estimate of the dense tensor.
- `elems` (mode `backrazor`): per sample, the `keep` share of elements of largest
  magnitude, as a bit-packed mask (1 bit per element) and the kept values in mask order.

`keep` is a share of the padded length L by default (`keep_of = "padded"`): real rows
are chosen first, so a sample with fewer than `keep * L` real tokens keeps all of them.
With `keep_of = "real"` it is a share of each sample's real tokens (rows: the slots past
that share point at padding rows, which carry no gradient; elems: per-sample top-k).

`pack` returns the metadata and the tensors to hand to `ctx.save_for_backward` (so the
saved-tensor hooks of `SavedTensorMeter` count exactly what is kept); `Sparse` rebuilds
what backward needs from them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import torch

from cotune.memory import kernels
from cotune.memory.kernels import pack_bits, unpack_bits

Mode = Literal["random", "norm", "backrazor"]
NormKind = Literal["linf", "l1", "l2"]
# What `keep` is a share of: every token row of the batch's padded length ("padded"), or
# each sample's real (non-padding) tokens ("real"). Without padding the two are the same.
KeepOf = Literal["padded", "real"]

# Beyond this many elements per sample, backrazor estimates the k-th largest magnitude
# from a random sample of _THRESHOLD_SAMPLE elements instead of an exact top-k (which
# costs tens of milliseconds per FFN-sized tensor on a CPU).
EXACT_TOPK_MAX = 1 << 14
_THRESHOLD_SAMPLE = 1 << 12


@dataclass
class Policy:
    """How sparse-saving ops choose what to keep (one object shared by a model's ops)."""

    mode: Mode
    keep: float
    rescale: bool = True
    norm: NormKind = "linf"
    ops: frozenset[str] = frozenset({"linear", "matmul", "softmax", "layernorm", "activation"})
    seed: int = 0
    keep_of: KeepOf = "padded"
    _generators: dict[str, torch.Generator] = field(default_factory=dict, repr=False)
    _last_pack: tuple | None = field(default=None, repr=False)

    def generator(self, device: torch.device) -> torch.Generator:
        """A private generator per device, so selection never perturbs the global RNG
        (dropout masks stay identical to the unpatched model's)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    @property
    def scaled(self) -> bool:
        return self.mode == "random" and self.rescale


# Which tokens are real (not padding), (batch, seq) bool; set around a forward pass by
# the hooks `apply_memory_option` installs, or by callers through `token_mask(...)`.
_TOKEN_MASK: ContextVar[torch.Tensor | None] = ContextVar("cotune_token_mask", default=None)


@contextmanager
def token_mask(mask: torch.Tensor | None):  # type: ignore[no-untyped-def]
    """Tell the sparse ops which tokens are real: `mask` is (batch, seq), nonzero = real."""
    token = _TOKEN_MASK.set(normalize_token_mask(mask))
    try:
        yield
    finally:
        _TOKEN_MASK.reset(token)


def normalize_token_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (batch, seq) mask as bool, or None when absent or when every token is real."""
    if mask is None or mask.dim() != 2:
        return None
    mask = mask.bool()
    return None if bool(mask.all()) else mask


def current_token_mask() -> torch.Tensor | None:
    return _TOKEN_MASK.get()


# Inside a checkpointed layer (see `cotune.memory.checkpoint`) autograd does not keep the
# saved tensors (checkpoint's hooks drop them), so the weak references of `pack_shared`'s
# cache would die before the next projection reads the same input. While this holds a
# list, `pack_shared` puts its latest pack in it, so the Q, K and V projections share one
# pack there too (the same selection as without checkpointing).
_HOLD_LAST_PACK: ContextVar[list[torch.Tensor] | None] = ContextVar(
    "cotune_hold_last_pack", default=None
)


@contextmanager
def hold_last_pack() -> Iterator[None]:
    """Keep `pack_shared`'s latest pack alive inside the block (checkpointed layers)."""
    token = _HOLD_LAST_PACK.set([])
    try:
        yield
    finally:
        _HOLD_LAST_PACK.reset(token)


def _valid_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Validity of the token rows of x (..., L, F) as a tensor broadcastable to x.shape[:-1]."""
    mask = _TOKEN_MASK.get()
    if mask is None or mask.dim() != 2 or x.dim() < 3:
        return None
    if mask.shape[0] != x.shape[0] or mask.shape[1] != x.shape[-2]:
        return None
    mask = mask.to(x.device)
    return mask.view(mask.shape[0], *([1] * (x.dim() - 3)), mask.shape[1])


def _row_priority(x: torch.Tensor, policy: Policy) -> torch.Tensor:
    if policy.mode == "random":
        u = torch.rand(x.shape[:-1], generator=policy.generator(torch.device("cpu")))
        return u.to(x.device)
    a = x.detach().float()
    if policy.norm == "linf":
        # one reduction, no |x| temporary the size of x (abs().amax() allocates one)
        return torch.linalg.vector_norm(a, ord=math.inf, dim=-1)
    if policy.norm == "l1":
        return a.abs().sum(-1)
    return torch.linalg.vector_norm(a, dim=-1)


def rows_to_keep(x: torch.Tensor, keep: float) -> int:
    return min(x.shape[-2], max(1, math.ceil(keep * x.shape[-2] - 1e-9)))


def _share_count(n: torch.Tensor, keep: float) -> torch.Tensor:
    """ceil(keep * n), at least 1, per entry of n (real rows or elements of each slice)."""
    return torch.ceil(n * keep - 1e-6).clamp(min=1).long()


@dataclass(frozen=True)
class PackMeta:
    kind: Literal["dense", "rows", "elems", "bits"]
    shape: tuple[int, ...]
    n_tensors: int
    has_scale: bool = False


@dataclass
class Packed:
    """What `pack` keeps (`tensors`, for save_for_backward) plus, during the forward pass,
    the selection itself so a companion tensor can be packed the same way."""

    meta: PackMeta
    tensors: list[torch.Tensor]
    index: torch.Tensor | None = None  # rows: (..., k) int64
    bits: torch.Tensor | None = None  # elems: (B, ceil(n / 8)) uint8 bit mask

    def select(self, other: torch.Tensor) -> torch.Tensor:
        """The entries of `other` (shaped like the packed tensor) that this pack keeps, in
        the pack's layout: rows (..., k, F), elems 1-D, dense unchanged."""
        if self.index is not None:
            idx = self.index
            return other.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, other.shape[-1]))
        if self.bits is not None:
            return kernels.compress(other, self.bits)
        return other


def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32


def select_rows(
    x: torch.Tensor, policy: Policy, priority: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row indices (..., k) to keep from x (..., L, F) and, with rescale, the per-slice
    inverse inclusion probability (...) of the kept rows."""
    k = rows_to_keep(x, policy.keep)
    if priority is None:
        priority = _row_priority(x, policy)
    valid = _valid_rows(x)
    if valid is not None:
        priority = priority.masked_fill(~valid.expand_as(priority), -math.inf)
    real = valid is not None and policy.keep_of == "real"
    idx = priority.topk(k, dim=-1, sorted=real).indices
    if not (real or policy.scaled):
        return idx, None
    n_valid = (
        valid.expand(priority.shape).sum(-1).float()
        if valid is not None
        else torch.full(priority.shape[:-1], float(x.shape[-2]), device=x.device)
    )
    kept: torch.Tensor | float = k
    if real:
        assert valid is not None
        idx, kept = _real_share_rows(idx, valid.expand(priority.shape), n_valid, policy.keep)
    scale = (n_valid / kept).clamp(min=1.0) if policy.scaled else None
    return idx, scale


def _real_share_rows(
    ranked: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor, keep: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`keep` of each slice's real rows, from `ranked` (..., k): the k rows of highest
    priority, real rows first, in priority order. The slots past a slice's
    ceil(keep * n_real) real rows go to padding rows (there are enough: k = ceil(keep * L)),
    which no loss reads, so their output gradient is zero and they add nothing to any
    gradient; the saved bytes stay those of k rows. Returns the rows and the real rows kept
    per slice."""
    k = ranked.shape[-1]
    k_real = _share_count(n_valid, keep).clamp(max=k)
    slot = torch.arange(k, device=ranked.device)
    chosen = slot < k_real.unsqueeze(-1)
    # 2: a kept real row; 1: padding; 0: a real row past the share
    rank = (~valid).to(torch.int8)
    rank.scatter_(-1, ranked, torch.where(chosen, 2, rank.gather(-1, ranked)).to(torch.int8))
    idx = rank.topk(k, dim=-1, sorted=False).indices
    return idx, k_real


def pack_rows(x: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor | None) -> Packed:
    values = x.detach().gather(-2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
    tensors = [values.contiguous(), idx.to(_index_dtype(x.shape[-2]))]
    if scale is not None:
        tensors.append(scale)
    meta = PackMeta("rows", tuple(x.shape), len(tensors), scale is not None)
    return Packed(meta, tensors, index=idx)


def _elem_threshold(x: torch.Tensor, policy: Policy, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-sample magnitude threshold key (B,) estimated from _THRESHOLD_SAMPLE randomly
    probed elements of x (invalid rows count as -1): about `keep` of the valid elements
    exceed it."""
    b = x.shape[0]
    n = math.prod(x.shape[1:])
    gen = policy.generator(torch.device("cpu"))
    rank = max(1, min(_THRESHOLD_SAMPLE, round((1 - policy.keep) * _THRESHOLD_SAMPLE)))
    if valid is None or policy.keep_of == "padded":
        probe = torch.randint(n, (b, _THRESHOLD_SAMPLE), generator=gen).to(x.device)
        return kernels.threshold_keys(x, probe, valid, rank - 1)
    # `keep` of each sample's real elements: probe real rows only (a sample without any
    # real row probes all of them)
    rows = valid.shape[1]
    f = n // rows
    weights = valid.float().cpu()
    weights[weights.sum(1) == 0] = 1.0
    row = torch.multinomial(weights, _THRESHOLD_SAMPLE, replacement=True, generator=gen)
    probe = row * f + torch.randint(f, (b, _THRESHOLD_SAMPLE), generator=gen)
    return kernels.threshold_keys(x, probe.to(x.device), None, rank - 1)


def _expected_share(keep: float) -> float:
    """An upper estimate of the share `_elem_threshold` keeps: keep plus four standard
    errors of a quantile estimated from _THRESHOLD_SAMPLE draws."""
    return min(1.0, keep + 4 * math.sqrt(keep * (1 - keep) / _THRESHOLD_SAMPLE))


def _valid_elem_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Validity of x's rows (B, R) with R = prod(x.shape[1:-1]), or None (all valid)."""
    valid = _valid_rows(x)
    if valid is None:
        return None
    return valid.expand(x.shape[:-1]).reshape(x.shape[0], -1).contiguous()


def _exact_topk_mask(x: torch.Tensor, policy: Policy, valid: torch.Tensor | None) -> torch.Tensor:
    b = x.shape[0]
    a = x.detach().reshape(b, -1).abs()
    n = a.shape[1]
    if valid is not None:
        a = a.masked_fill(~valid.repeat_interleave(n // valid.shape[1], dim=1), -1.0)
    k = max(1, math.ceil(policy.keep * n - 1e-9))
    if valid is None or policy.keep_of == "padded":
        idx = a.topk(k, dim=1, sorted=False).indices
        return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(1, idx, True)
    # `keep` of each sample's real elements: the top k_b of the sample, k_b its own
    n_real = valid.sum(1) * (n // valid.shape[1])
    k_b = _share_count(n_real, policy.keep)
    idx = a.topk(int(k_b.max()), dim=1, sorted=True).indices
    chosen = torch.arange(idx.shape[1], device=a.device) < k_b.unsqueeze(1)
    return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(1, idx, chosen)


def pack_backrazor(x: torch.Tensor, policy: Policy) -> Packed:
    """Per sample, the `keep` share of x's elements of largest magnitude, bit-packed.

    Exact top-k up to EXACT_TOPK_MAX elements per sample; beyond, the k-th largest
    magnitude is estimated from a random sample and every element above it is kept in one
    pass (the count is then within about 1% of k: the bytes saved are measured, not
    assumed)."""
    valid = _valid_elem_rows(x)
    n = math.prod(x.shape[1:])
    if n <= EXACT_TOPK_MAX:
        bits = pack_bits(_exact_topk_mask(x, policy, valid))
        return pack_elems(x, bits)
    thr = _elem_threshold(x, policy, valid)
    values, bits = kernels.select_compress(x, thr, valid, _expected_share(policy.keep))
    return Packed(PackMeta("elems", tuple(x.shape), 2), [values, bits], bits=bits)


def select_elems(x: torch.Tensor, policy: Policy) -> torch.Tensor:
    """The bit mask (B, ceil(n / 8)) uint8 of what `pack_backrazor` keeps of x."""
    return pack_backrazor(x, policy).tensors[1]


def pack_elems(x: torch.Tensor, bits: torch.Tensor) -> Packed:
    """x's elements at the set bits of a (B, ceil(n / 8)) bit mask."""
    values = kernels.compress(x, bits)
    return Packed(PackMeta("elems", tuple(x.shape), 2), [values, bits], bits=bits)


def pack_dense(x: torch.Tensor) -> Packed:
    """x itself; a view of a larger storage is copied so that storage is not kept alive."""
    x = x.detach()
    if x.untyped_storage().nbytes() > x.numel() * x.element_size():
        x = x.clone(memory_format=torch.contiguous_format)
    return Packed(PackMeta("dense", tuple(x.shape), 1), [x])


def pack_positive(x: torch.Tensor) -> Packed:
    """Where x > 0, as bits (1 bit per element; a 0/1 mask packs to itself)."""
    return Packed(PackMeta("bits", tuple(x.shape), 1), [kernels.positive_bits(x)])


def pack(x: torch.Tensor, policy: Policy | None) -> Packed:
    """Choose and pack what to keep of x (..., L, F) under `policy` (None: dense).

    Tensors without a token dimension (fewer than 3 dims, e.g. pooled features) are kept
    dense."""
    if policy is None or policy.keep >= 1.0 or x.dim() < 3:
        return pack_dense(x)
    if policy.mode == "backrazor":
        return pack_backrazor(x, policy)
    idx, scale = select_rows(x, policy)
    if idx.shape[-1] >= x.shape[-2]:
        return pack_dense(x)
    return pack_rows(x, idx, scale)


def pack_shared(x: torch.Tensor, policy: Policy, dtype: torch.dtype | None = None) -> Packed:
    """`pack`, reusing the previous pack when called again on the very same tensor object
    (the Q, K and V projections, or gate and up, all read one input: it is kept once).
    With `dtype` the kept values are stored in that dtype (autocast)."""
    hit = policy._last_pack
    if hit is not None:
        ref, version, hit_dtype, meta, tensor_refs = hit
        tensors = [r() for r in tensor_refs]
        if (
            ref() is x
            and x._version == version
            and hit_dtype == dtype
            and all(t is not None for t in tensors)
        ):
            return Packed(meta, tensors)
    packed = pack(x, policy)
    if dtype is not None and packed.tensors[0].dtype != dtype:
        packed.tensors[0] = packed.tensors[0].to(dtype)
    policy._last_pack = (
        weakref.ref(x),
        x._version,
        dtype,
        packed.meta,
        [weakref.ref(t) for t in packed.tensors],
    )
    hold = _HOLD_LAST_PACK.get()
    if hold is not None:
        hold[:] = packed.tensors
    return packed


class Sparse:
    """A packed tensor rebuilt in backward."""

    def __init__(self, meta: PackMeta, tensors: tuple[torch.Tensor, ...]) -> None:
        self.meta = meta
        self.kind = meta.kind
        self.shape = meta.shape
        self.tensors = tensors

    # -- rows -------------------------------------------------------------------------
    @property
    def values(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def index(self) -> torch.Tensor:
        """Row indices (..., k) as int64 (rows kind only)."""
        return self.tensors[1].long()

    def row_scale(self) -> torch.Tensor | None:
        """Inverse inclusion probability per slice, shaped (..., 1, 1), or None."""
        if self.kind != "rows" or not self.meta.has_scale:
            return None
        return self.tensors[2].unsqueeze(-1).unsqueeze(-1)

    def scaled_values(self) -> torch.Tensor:
        scale = self.row_scale()
        return self.values if scale is None else self.values * scale.to(self.values.dtype)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of t (..., L, G) at this pack's kept row indices (rows kind)."""
        idx = self.index
        return t.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))

    def scatter_rows(self, rows: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Write rows (..., k, G) into `into` (..., L, G) at the kept row indices."""
        idx = self.index
        return into.scatter_(-2, idx.unsqueeze(-1).expand(*idx.shape, rows.shape[-1]), rows)

    # -- elems ------------------------------------------------------------------------
    @property
    def bits(self) -> torch.Tensor:
        """The bit mask (B, ceil(n / 8)) uint8 of kept elements (elems kind)."""
        assert self.kind == "elems"
        return self.tensors[1]

    def elem_mask(self) -> torch.Tensor | None:
        """Kept elements as bool in the tensor's shape (elems kind), else None."""
        if self.kind != "elems":
            return None
        n = math.prod(self.shape[1:])
        return unpack_bits(self.tensors[1], n).reshape(self.shape)

    # -- bits -------------------------------------------------------------------------
    def where_set(self, t: torch.Tensor) -> torch.Tensor:
        """t (shaped like the packed bool tensor) where its bit is set, +0 elsewhere
        (bits kind)."""
        assert self.kind == "bits"
        return kernels.masked(t, self.tensors[0])

    # -- any --------------------------------------------------------------------------
    def dense(self, scaled: bool = False) -> torch.Tensor:
        """Zero-filled reconstruction; `scaled` applies the rescale of random rows."""
        if self.kind == "dense":
            return self.tensors[0]
        if self.kind == "bits":
            return unpack_bits(self.tensors[0], math.prod(self.shape)).reshape(self.shape)
        if self.kind == "rows":
            values = self.scaled_values() if scaled else self.values
            return self.scatter_rows(values, values.new_zeros(self.shape))
        return self.place(self.values)

    def place(self, kept: torch.Tensor) -> torch.Tensor:
        """A zero-filled tensor of this pack's shape with `kept` (in the pack's layout, as
        `Packed.select` made it) at the kept positions."""
        if self.kind == "rows":
            return self.scatter_rows(kept, kept.new_zeros(self.shape))
        if self.kind == "elems":
            return kernels.expand(kept, self.bits, self.shape)
        return kept.reshape(self.shape)


class SaveList:
    """Collects packs for one `ctx.save_for_backward` call and rebuilds them afterwards."""

    def __init__(self) -> None:
        self.metas: list[PackMeta | None] = []
        self.tensors: list[torch.Tensor] = []

    def add(self, packed: Packed | None) -> None:
        if packed is None:
            self.metas.append(None)
            return
        self.metas.append(packed.meta)
        self.tensors.extend(packed.tensors)

    def add_tensor(self, t: torch.Tensor | None) -> None:
        self.add(None if t is None else Packed(PackMeta("dense", tuple(t.shape), 1), [t]))

    @staticmethod
    def restore(
        metas: list[PackMeta | None], saved: tuple[torch.Tensor, ...]
    ) -> list[Sparse | None]:
        out: list[Sparse | None] = []
        pos = 0
        for meta in metas:
            if meta is None:
                out.append(None)
                continue
            out.append(Sparse(meta, saved[pos : pos + meta.n_tensors]))
            pos += meta.n_tensors
        return out
