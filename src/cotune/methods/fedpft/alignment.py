"""fedpft's alignment: making the proxy's layers behave like the FM's.

- per-layer outputs of a model (`capture_layer_outputs`, `layer_outputs`) and the
  alignment loss, the MSE between proxy and FM layer outputs normalised by the FM
  output's mean square (`normalised_mse`, `alignment_loss`), and the gap per layer on
  held-out public data (`layer_gaps`);
- `align`: layer-level alignment (every proxy layer trained to reproduce its FM layer's
  output from the FM's input to it) and neuron-level alignment (only the chosen neurons'
  rows and columns move, `neuron_masks`);
- `NeuronStats`: per-neuron activation statistics on a device (mean |activation| of the
  FFN's post-GELU output over real tokens; for an image, over its CLS and patch
  tokens) and `least_used`, the neurons to re-align.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cotune.models.lora import unwrap
from cotune.models.proxy import ProxyPlan, encoder_layers, ffn_linears, ffn_param_names
from cotune.training.placement import device_of, to_device

# ----------------------------------------------------------------------------- layer outputs


@contextmanager
def capture_layer_outputs(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, each forward appends every encoder layer's output hidden states."""
    outs: list[Tensor] = []

    def hook(_m: nn.Module, _inp: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        assert isinstance(out, Tensor)
        outs.append(out)

    handles = [layer.register_forward_hook(hook) for layer in encoder_layers(model)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def layer_outputs(model: nn.Module, batch: dict[str, Tensor]) -> list[Tensor]:
    """Every encoder layer's output for `batch` (input_ids, attention_mask[,
    token_type_ids] of text, or pixel_values of images)."""
    base = unwrap(model)
    with capture_layer_outputs(model) as outs:
        base.encode(  # type: ignore[operator]
            batch.get("input_ids"), batch.get("attention_mask"), batch.get("token_type_ids"),
            batch.get("pixel_values"),
        )  # fmt: skip
    return list(outs)


def normalised_mse(pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """MSE(pred, target) / mean(target^2), over real tokens (mask 1)."""
    diff = (pred.float() - target.float()).pow(2).mean(dim=-1)
    power = target.float().pow(2).mean(dim=-1)
    if mask is None:
        return diff.mean() / power.mean().clamp(min=1e-12)
    m = mask.to(diff.dtype)
    return (diff * m).sum() / (power * m).sum().clamp(min=1e-12)


def alignment_loss(
    proxy_outs: list[Tensor], fm_outs: list[Tensor], plan: ProxyPlan, mask: Tensor | None
) -> Tensor:
    """Mean over proxy layers of the normalised MSE between proxy layer j's output and FM
    layer plan.layer_map[j]'s output."""
    losses = [normalised_mse(p, fm_outs[plan.layer_map[j]], mask) for j, p in enumerate(proxy_outs)]
    return torch.stack(losses).mean()


@torch.no_grad()
def layer_gaps(
    proxy: nn.Module, fm: nn.Module, plan: ProxyPlan, batches: Iterable[dict[str, Tensor]]
) -> list[float]:
    """Per proxy layer, the normalised MSE to the FM's matching layer over `batches`
    (token-weighted: sum of squared errors / sum of the FM's squared outputs)."""
    was = proxy.training, fm.training
    proxy.eval()
    fm.eval()
    err = [0.0] * len(plan.layer_map)
    power = [0.0] * len(plan.layer_map)
    device = device_of(fm)
    for cpu_batch in batches:
        batch = to_device(cpu_batch, device)
        p_outs, f_outs = layer_outputs(proxy, batch), layer_outputs(fm, batch)
        mask = batch.get("attention_mask")
        m = None if mask is None else mask.unsqueeze(-1).float()
        for j, p in enumerate(p_outs):
            f = f_outs[plan.layer_map[j]].float()
            d = (p.float() - f).pow(2)
            s = f.pow(2)
            if m is not None:
                d, s = d * m, s * m
            err[j] += float(d.sum())
            power[j] += float(s.sum())
    proxy.train(was[0])
    fm.train(was[1])
    return [e / max(s, 1e-12) for e, s in zip(err, power, strict=True)]


# ----------------------------------------------------------------------------- alignment


@dataclass
class AlignStats:
    steps: int
    first_loss: float
    last_loss: float
    mean_loss: float


def align(
    proxy: nn.Module,
    fm: nn.Module,
    plan: ProxyPlan,
    batches: Iterator[dict[str, Tensor]],
    steps: int,
    lr: float,
    *,
    params: list[str] | None = None,
    grad_masks: dict[str, Tensor] | None = None,
    max_grad_norm: float | None = 1.0,
) -> AlignStats:
    """Train the proxy's `params` (default: compressed FFNs + their LayerNorm) for `steps`
    so its layer outputs match the FM's (`alignment_loss`). `grad_masks[name]` (same
    shape as the parameter, 0/1) restricts updates to part of a tensor: Adam without
    weight decay leaves entries whose gradient is always 0 exactly unchanged.

    Both models run in eval mode (no dropout); the FM gets no gradients. Every other
    parameter's `requires_grad` is restored afterwards.
    """
    names = params if params is not None else ffn_param_names(proxy, plan)
    named = dict(proxy.named_parameters())
    saved = {n: p.requires_grad for n, p in named.items()}
    for p in named.values():
        p.requires_grad_(False)
    train = [named[n] for n in names]
    for p in train:
        p.requires_grad_(True)
    handles = []
    for n, mask in (grad_masks or {}).items():
        handles.append(named[n].register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype)))
    was = proxy.training, fm.training
    proxy.eval()
    fm.eval()
    opt = torch.optim.Adam(train, lr=lr, weight_decay=0.0) if train else None
    losses: list[float] = []
    try:
        for step in range(steps):
            if opt is None:
                break
            batch = to_device(next(batches), device_of(fm))
            with torch.no_grad():
                f_outs = layer_outputs(fm, batch)
            p_outs = layer_outputs(proxy, batch)
            loss = alignment_loss(p_outs, f_outs, plan, batch.get("attention_mask"))
            loss.backward()
            if max_grad_norm:  # 0 or None: no clipping
                nn.utils.clip_grad_norm_(train, max_grad_norm)
            # linear decay to 0.1 x lr
            for g in opt.param_groups:
                g["lr"] = lr * (1.0 - 0.9 * step / max(steps - 1, 1))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        for h in handles:
            h.remove()
        for n, p in named.items():
            p.requires_grad_(saved[n])
            p.grad = None
        proxy.train(was[0])
        fm.train(was[1])
    if not losses:
        return AlignStats(0, math.nan, math.nan, math.nan)
    return AlignStats(len(losses), losses[0], losses[-1], sum(losses) / len(losses))


def neuron_masks(
    proxy: nn.Module, plan: ProxyPlan, realign: dict[int, Tensor]
) -> tuple[list[str], dict[str, Tensor]]:
    """Parameters and gradient masks that let only the neurons `realign[j]` (indices into
    proxy layer j's FFN) change: their input rows and biases and output columns."""
    layers = encoder_layers(proxy)
    names: list[str] = []
    masks: dict[str, Tensor] = {}
    named = {id(p): n for n, p in proxy.named_parameters()}
    for j, idx in realign.items():
        inter, out = ffn_linears(layers[j])
        sel = torch.zeros(inter.out_features)
        sel[idx.long()] = 1.0
        pairs = [(inter.weight, sel[:, None].expand_as(inter.weight)),
                 (out.weight, sel[None, :].expand_as(out.weight))]  # fmt: skip
        if inter.bias is not None:
            pairs.append((inter.bias, sel))
        for p, m in pairs:
            n = named[id(p)]
            names.append(n)
            masks[n] = m.contiguous()
    return names, masks


# ----------------------------------------------------------------------------- statistics


class NeuronStats:
    """Mean |activation| of every FFN neuron (post-GELU) over real tokens, per proxy layer,
    accumulated over the forwards run while `attached` (training forwards included)."""

    def __init__(self, model: nn.Module, plan: ProxyPlan) -> None:
        self.model = model
        self.plan = plan
        self.sums: dict[int, Tensor] = {}
        self.tokens: dict[int, float] = {}
        self._mask: Tensor | None = None

    @contextmanager
    def attached(self) -> Iterator[NeuronStats]:
        base = unwrap(self.model)

        def grab_mask(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            if mask is None and len(args) > 1:
                mask = args[1]
            self._mask = mask

        handles = [base.register_forward_pre_hook(grab_mask, with_kwargs=True)]
        for j, layer in enumerate(encoder_layers(self.model)):
            if self.plan.compressed[j]:
                # the FFN's activations are the input of its outer linear
                outer = ffn_linears(layer)[1]
                handles.append(outer.register_forward_pre_hook(self._hook(j)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, j: int):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            a = args[0].detach().float().abs()  # (batch, tokens, neurons)
            if self._mask is not None:
                m = self._mask.to(a.dtype).unsqueeze(-1)
                s, n = (a * m).sum(dim=(0, 1)), float(m.sum())
            else:
                s, n = a.sum(dim=(0, 1)), float(a.shape[0] * a.shape[1])
            self.sums[j] = self.sums.get(j, torch.zeros_like(s)) + s
            self.tokens[j] = self.tokens.get(j, 0.0) + n

        return fn

    def means(self) -> dict[int, Tensor]:
        return {j: s / max(self.tokens[j], 1.0) for j, s in self.sums.items()}


def least_used(usage: dict[int, Tensor], keep: float) -> dict[int, Tensor]:
    """Per layer, the indices of the `1 - keep` fraction of neurons with the lowest usage."""
    out = {}
    for j, u in usage.items():
        n = len(u) - int(round(keep * len(u)))
        if n > 0:
            out[j] = torch.argsort(u, stable=True)[:n].sort().values
    return out
