"""Optimiser and learning-rate schedule, the same for every side of every method."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from cotune.config import Config, TrainConfig


def _param_groups(params: list[nn.Parameter], cfg: Config) -> list[dict[str, Any]]:
    """AdamW's groups: weight decay on matrices, none on biases and norms."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _build(params: list[nn.Parameter], cfg: Config, lr: float) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    fused = bool(params) and all(p.device.type == "cpu" and p.is_floating_point() for p in params)
    return torch.optim.AdamW(_param_groups(params, cfg), lr=lr, betas=(0.9, 0.999),
                             fused=fused or None)  # fmt: skip


def make_optimizer(
    params: Iterable[nn.Parameter], cfg: Config, lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW (no weight decay on biases and norms) or SGD over the trainable params;
    with `memory.step_in_backward`, the same optimiser stepped inside backward
    (`StepInBackward`).

    AdamW is torch's fused kernel when every parameter is a floating-point CPU tensor:
    one pass per tensor without temporaries, where the default per-tensor loop allocates
    two scratch copies of each parameter (90 MiB for minilm's word embeddings) and is
    about 8x slower on CPU (measured in docs/memory.md). Elsewhere torch's default."""
    lr = cfg.resolved_lr() if lr is None else lr
    params = [p for p in params if p.requires_grad]
    if cfg.memory.step_in_backward:
        return StepInBackward(params, lambda p: _build([p], cfg, lr))
    return _build(params, cfg, lr)


class _States(Mapping[torch.Tensor, dict[str, Any]]):
    """The per-parameter optimisers' states as one `optimizer.state` mapping."""

    def __init__(self, inner: dict[torch.Tensor, torch.optim.Optimizer]) -> None:
        self.inner = inner

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        return self.inner[p].state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p, opt in self.inner.items() if p in opt.state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


# Which StepInBackward steps a parameter: one hook per parameter for its lifetime,
# dispatching to the parameter's newest optimiser while that one is alive. A model
# trained again (a federated client's cached model, every round) gets a new optimiser
# that takes its parameters over: an earlier one never steps them again.
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> weakref(StepInBackward)
_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> its hook's handle


def _dispatch(p: torch.Tensor) -> None:
    ref = _OWNER.get(p)
    owner = ref() if ref is not None else None
    if owner is not None:
        owner._step_one(p)


class StepInBackward(torch.optim.Optimizer):
    """An optimiser stepped inside backward: one optimiser per trainable parameter
    (`build(p)`, the run's own AdamW or SGD), stepped by a post-accumulate-grad hook the
    moment that parameter's gradient is complete, which then frees the gradient. The
    whole model's gradients never exist at once: at most the ones backward is still
    accumulating (torchtune's `optimizer_in_bwd`).

    The update of each parameter is the one the plain optimiser makes (same kernel,
    same state), so without clipping the trajectory is the same. Global-norm clipping is
    not possible (the norm is known only once every gradient exists): the config refuses
    `memory.step_in_backward` with `train.max_grad_norm` set. One backward per step: a
    second backward before `step()` would step the parameters it reaches again.

    `step()` and `zero_grad()` are no-ops (the work happened in backward); learning-rate
    schedules work as usual: `param_groups` are the per-parameter optimisers' own groups.
    The newest StepInBackward over a parameter is the one that steps it (`release()`
    hands it back to plain gradients).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        build: Callable[[nn.Parameter], torch.optim.Optimizer],
    ) -> None:
        if not params:
            raise ValueError("StepInBackward needs at least one trainable parameter")
        self.inner: dict[torch.Tensor, torch.optim.Optimizer] = {p: build(p) for p in params}
        first = next(iter(self.inner.values()))
        super().__init__(params, dict(first.defaults))
        # the groups the schedule adjusts are the ones the inner optimisers step with
        self.param_groups = [g for opt in self.inner.values() for g in opt.param_groups]
        self.state = _States(self.inner)  # type: ignore[assignment]
        me = weakref.ref(self)
        for p in params:
            if p not in _HOOKED:
                _HOOKED[p] = p.register_post_accumulate_grad_hook(_dispatch)
            _OWNER[p] = me

    def _step_one(self, p: torch.Tensor) -> None:
        opt = self.inner[p]
        if p.grad is not None and p.grad.is_sparse:
            _step_sparse(opt, p)
        else:
            opt.step()
        p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("StepInBackward steps inside backward; it takes no closure")
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None  # each gradient was freed as its parameter stepped

    def state_dict(self) -> dict[str, Any]:
        """Every parameter's optimiser state, in parameter order."""
        return {"per_parameter": [opt.state_dict() for opt in self.inner.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict["per_parameter"]
        if len(inner) != len(self.inner):
            raise ValueError(
                f"optimiser state for {len(inner)} parameters, this optimiser has {len(self.inner)}"
            )
        for opt, state in zip(self.inner.values(), inner, strict=True):
            opt.load_state_dict(state)
        # loading gives each inner optimiser new group dicts: the schedule adjusts those
        self.param_groups = [g for opt in self.inner.values() for g in opt.param_groups]

    def release(self) -> None:
        """Stop stepping the parameters this optimiser still owns (they keep their
        gradients again, as under a plain optimiser)."""
        for p in self.inner:
            ref = _OWNER.get(p)
            if ref is not None and ref() is self:
                del _OWNER[p]


SPARSE_BLOCK_ELEMS = 1 << 20  # a block of rows densified at a time: 4 MiB of fp32


@torch.no_grad()
def _step_sparse(opt: torch.optim.Optimizer, p: torch.Tensor) -> None:
    """Step `p`, whose gradient is sparse (an embedding table's rows), as `opt` steps
    the dense gradient: fused AdamW block of rows by block of rows (AdamW is
    element-wise, so each element gets the same update; rows the batch did not use get
    a zero gradient, as in the dense one); SGD takes the sparse gradient itself; any
    other optimiser gets it densified."""
    grad = p.grad
    assert grad is not None
    group = opt.param_groups[0]
    fused_adamw = isinstance(opt, torch.optim.AdamW) and group.get("fused") and not group["amsgrad"]
    if isinstance(opt, torch.optim.SGD) or not fused_adamw or p.dim() != 2:
        if not isinstance(opt, torch.optim.SGD):
            p.grad = grad.to_dense()
        opt.step()
        return
    state = opt.state[p]
    if not state:  # as AdamW initialises it on its first step
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1  # fused AdamW reads the step, the optimiser counts it
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    p.grad = None
    lr = group["lr"]
    block = max(1, SPARSE_BLOCK_ELEMS // max(p.shape[1], 1))
    for start in range(0, p.shape[0], block):
        stop = min(start + block, p.shape[0])
        inside = (rows >= start) & (rows < stop)
        dense = torch.zeros((stop - start, p.shape[1]), dtype=p.dtype, device=p.device)
        dense.index_copy_(0, rows[inside] - start, values[inside])
        torch._fused_adamw_(
            [p[start:stop]], [dense], [state["exp_avg"][start:stop]],
            [state["exp_avg_sq"][start:stop]], [], [state["step"]],
            lr=lr, beta1=group["betas"][0], beta2=group["betas"][1],
            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
            maximize=group["maximize"], grad_scale=None, found_inf=None,
        )  # fmt: skip


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base LR after `step` optimiser steps (linear warmup, then decay)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    remaining = max(total - warmup, 1)
    return max(0.0, (total - step) / remaining)


def make_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, train: TrainConfig, offset: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then linear decay (or constant),
    entered `offset` steps in.

    Every side of a split or federated method builds its own schedule with this, so
    device and cloud optimisers follow the same LR curve; a federated client enters the
    curve of the whole budget at its round's offset.
    """
    warmup = math.ceil(train.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s + offset, total_steps, warmup, train.schedule)
    )


def round_schedule(
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    steps_per_round: int,
    rounds: int,
    server_round: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR curve of a whole federated budget (warmup, then decay over all rounds),
    entered at this round's offset, so round r continues where round r - 1 stopped."""
    total = steps_per_round * rounds
    return make_schedule(optimizer, total, train, offset=steps_per_round * (server_round - 1))


def total_steps(train: TrainConfig, batches_per_epoch: int) -> int:
    if train.steps is not None:
        return train.steps
    epochs = train.epochs if train.epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch))
