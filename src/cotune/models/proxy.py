"""FedPFT's proxy (sub-FM): a smaller copy of a foundation model (FM) that devices train.

Two kinds (`proxy.kind`):

- ``neuron`` (FedPFT): every encoder layer stays, but in each layer outside
  `proxy.keep_layers` (default: first and last) the FFN keeps only its top-m neurons by
  saliency, the L2 norm of the neuron's input-weight row concatenated with its
  output-weight column. Biases of kept neurons are kept; attention, embeddings and
  norms are unchanged.
- ``layer_drop`` (offsite-tuning style): whole layers are dropped instead, keeping
  `keep_layers` plus evenly spaced middle layers, as many as give the neuron proxy's
  parameter budget.

Also here: per-layer outputs and the alignment loss (MSE normalised by the FM output's
mean square), layer-level and neuron-level alignment, and per-neuron activation
statistics (mean |activation| of the FFN's post-GELU output over real tokens).

Supported families: BERT-style encoders (`bert`, `roberta`: `encoder.layer[i]` with
`intermediate.dense`, `output.dense`, `output.LayerNorm`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cotune.config.schema import ProxyConfig
from cotune.errors import ModelError
from cotune.models.lora import unwrap

PROXY_FAMILIES = ("bert", "roberta")


# ----------------------------------------------------------------------------- structure


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's layer list of a (peft-wrapped) SequenceClassifier or base model."""
    base = unwrap(model)
    backbone = getattr(base, "backbone", base)
    encoder = getattr(backbone, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        family = getattr(base, "family", type(backbone).__name__)
        raise ModelError(
            f"proxy construction needs a BERT-style encoder (encoder.layer[i].intermediate); "
            f"this model ({family}) has none. Families with proxies: {', '.join(PROXY_FAMILIES)}"
        )
    return layers


def _ffn(layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    return layer.intermediate.dense, layer.output.dense


def ffn_size(model: nn.Module, layer: int) -> int:
    return _ffn(encoder_layers(model)[layer])[0].out_features


@dataclass(frozen=True)
class ProxyPlan:
    """The proxy's shape, derivable from the config alone (no weights needed).

    `layer_map[j]` is the FM layer that proxy layer j comes from; `ffn_keep[j]` the
    number of FFN neurons proxy layer j keeps; `compressed[j]` whether proxy layer j is
    trained by alignment (its FM layer is not in keep_layers).
    """

    kind: str
    layer_map: tuple[int, ...]
    ffn_keep: tuple[int, ...]
    compressed: tuple[bool, ...]


def keep_layers(cfg: ProxyConfig, n_layers: int) -> list[int]:
    """`cfg.keep_layers` (negative indices count from the end), default first and last."""
    raw = cfg.keep_layers if cfg.keep_layers is not None else [0, n_layers - 1]
    out = []
    for i in raw:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ModelError(
                f"proxy.keep_layers: layer {i} does not exist; the model has layers "
                f"0..{n_layers - 1}"
            )
        out.append(j)
    return sorted(set(out))


def neuron_count(ffn_keep: float, d_ff: int) -> int:
    """`proxy.ffn_keep` as a neuron count: a fraction (<= 1) of d_ff, or a count (> 1)."""
    m = int(round(ffn_keep * d_ff)) if ffn_keep <= 1 else int(ffn_keep)
    if not 1 <= m <= d_ff:
        raise ModelError(f"proxy.ffn_keep = {ffn_keep} gives {m} neurons; the FFN has {d_ff}")
    return m


def plan_proxy(model: nn.Module, cfg: ProxyConfig) -> ProxyPlan:
    layers = encoder_layers(model)
    n = len(layers)
    keep = keep_layers(cfg, n)
    sizes = [ffn_size(model, i) for i in range(n)]
    if cfg.kind == "neuron":
        ffn = tuple(
            sizes[i] if i in keep else neuron_count(cfg.ffn_keep, sizes[i]) for i in range(n)
        )
        return ProxyPlan("neuron", tuple(range(n)), ffn, tuple(i not in keep for i in range(n)))
    # layer_drop: as many whole layers as the neuron proxy's non-embedding budget allows
    budget = sum(_layer_params(layers[i], sizes[i] if i in keep else
                               neuron_count(cfg.ffn_keep, sizes[i])) for i in range(n))  # fmt: skip
    per_layer = [_layer_params(layers[i], sizes[i]) for i in range(n)]
    n_keep = max(len(keep), min(n, int(round(budget / (sum(per_layer) / n)))))
    middle = [i for i in range(n) if i not in keep]
    extra = n_keep - len(keep)
    chosen = set(keep)
    if extra > 0 and middle:
        for k in range(extra):
            pos = (
                round(k * (len(middle) - 1) / max(extra - 1, 1)) if extra > 1 else len(middle) // 2
            )
            chosen.add(middle[pos])
    kept = sorted(chosen)
    return ProxyPlan(
        "layer_drop",
        tuple(kept),
        tuple(sizes[i] for i in kept),
        tuple(i not in keep for i in kept),
    )


def _layer_params(layer: nn.Module, d_ff: int) -> int:
    inter, out = _ffn(layer)
    ffn = d_ff * (inter.in_features + 1) + out.out_features * d_ff + out.out_features
    attn = sum(p.numel() for p in layer.parameters()) - sum(
        p.numel() for p in (*inter.parameters(), *out.parameters())
    )
    return ffn + attn


def non_embedding_params(model: nn.Module) -> int:
    """Parameters of the encoder layers (the part a proxy shrinks)."""
    return sum(p.numel() for layer in encoder_layers(model) for p in layer.parameters())


# ----------------------------------------------------------------------------- construction


def neuron_saliency(layer: nn.Module) -> Tensor:
    """Per-neuron saliency: ||[W_in[i, :], W_out[:, i]]||_2 (FedPFT)."""
    inter, out = _ffn(layer)
    w_in = inter.weight.detach().float()  # (d_ff, d)
    w_out = out.weight.detach().float()  # (d, d_ff)
    return (w_in.pow(2).sum(dim=1) + w_out.pow(2).sum(dim=0)).sqrt()


def _linear_like(src: nn.Linear, in_f: int, out_f: int) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=src.bias is not None)
    return lin.to(dtype=src.weight.dtype, device=src.weight.device)


def shrink_ffn(layer: nn.Module, neurons: Tensor) -> None:
    """Keep only FFN neurons `neurons` (sorted indices) of `layer`, in place."""
    inter, out = _ffn(layer)
    idx = neurons.to(torch.long)
    new_in = _linear_like(inter, inter.in_features, len(idx))
    new_out = _linear_like(out, len(idx), out.out_features)
    with torch.no_grad():
        new_in.weight.copy_(inter.weight[idx])
        if inter.bias is not None:
            new_in.bias.copy_(inter.bias[idx])
        new_out.weight.copy_(out.weight[:, idx])
        if out.bias is not None:
            new_out.bias.copy_(out.bias)
    for new, old in ((new_in, inter), (new_out, out)):  # frozen stays frozen
        for p_new, p_old in zip(new.parameters(), old.parameters(), strict=True):
            p_new.requires_grad_(p_old.requires_grad)
    layer.intermediate.dense = new_in
    layer.output.dense = new_out


def top_neurons(layer: nn.Module, m: int) -> Tensor:
    """Indices (ascending) of the m most salient FFN neurons of `layer`."""
    sal = neuron_saliency(layer)
    return torch.topk(sal, m).indices.sort().values


def _apply_plan(proxy: nn.Module, plan: ProxyPlan, neurons: dict[int, Tensor]) -> None:
    layers = encoder_layers(proxy)
    if plan.kind == "layer_drop":
        kept = nn.ModuleList([layers[i] for i in plan.layer_map])
        parent = unwrap(proxy)
        parent = getattr(parent, "backbone", parent)
        parent.encoder.layer = kept
        parent.config.num_hidden_layers = len(kept)
        for j, layer in enumerate(kept):  # keep per-layer indices consistent
            attn = getattr(getattr(layer, "attention", None), "self", None)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = j
        return
    for i, idx in neurons.items():
        shrink_ffn(layers[i], idx)


def build_proxy(
    model: nn.Module, cfg: ProxyConfig
) -> tuple[nn.Module, ProxyPlan, dict[int, Tensor]]:
    """(proxy, plan, kept neuron indices per FM layer) from the FM `model` (left unchanged).

    The proxy is a deep copy of `model` (peft wrapper, head and adapters included) with
    compressed FFNs (neuron) or fewer layers (layer_drop). Module names of the kept
    layers are unchanged for `neuron`; for `layer_drop` proxy layer j is FM layer
    `plan.layer_map[j]` (see `to_fm_names` / `to_proxy_names`).
    """
    plan = plan_proxy(model, cfg)
    layers = encoder_layers(model)
    neurons: dict[int, Tensor] = {}
    if plan.kind == "neuron":
        for i, m in enumerate(plan.ffn_keep):
            if plan.compressed[i] and m < ffn_size(model, i):
                neurons[i] = top_neurons(layers[i], m)
    proxy = copy.deepcopy(model)
    _apply_plan(proxy, plan, neurons)
    return proxy, plan, neurons


def proxy_skeleton(model: nn.Module, plan: ProxyPlan) -> nn.Module:
    """A model of the proxy's shape built from `model` in place (the FFNs keep their
    first neurons): what a device builds before it receives the proxy's weights, all of
    which then overwrite the skeleton's (`load_proxy_weights`)."""
    neurons = {
        i: torch.arange(m)
        for i, m in enumerate(plan.ffn_keep)
        if plan.kind == "neuron" and m < ffn_size(model, i)
    }
    _apply_plan(model, plan, neurons)
    return model


# ----------------------------------------------------------------------------- weights that travel


def proxy_weights(proxy: nn.Module) -> dict[str, Tensor]:
    """The proxy's frozen tensors (everything that does not train on the device), by name."""
    return {n: p.detach() for n, p in proxy.named_parameters() if not p.requires_grad}


def load_proxy_weights(proxy: nn.Module, weights: dict[str, Tensor]) -> None:
    """Overwrite every frozen tensor of `proxy` with `weights` (exact names and shapes)."""
    params = {n: p for n, p in proxy.named_parameters() if not p.requires_grad}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ModelError(
            f"proxy weights do not match the proxy: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            w = weights[n]
            if tuple(w.shape) != tuple(p.shape):
                raise ModelError(
                    f"proxy weight {n}: shape {tuple(w.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(w)


def ffn_param_names(proxy: nn.Module, plan: ProxyPlan, *, norm: bool = True) -> list[str]:
    """Names of the compressed layers' FFN parameters (and their LayerNorm)."""
    wanted = []
    for j, compressed in enumerate(plan.compressed):
        if compressed:
            parts = ["intermediate.dense.", "output.dense."] + (
                ["output.LayerNorm."] if norm else []
            )
            wanted += [f"layer.{j}.{p}" for p in parts]
    return [n for n, _ in proxy.named_parameters() if any(w in n for w in wanted)]


def _layer_rename(name: str, mapping: dict[int, int]) -> str:
    marker = "encoder.layer."
    at = name.find(marker)
    if at < 0:
        return name
    start = at + len(marker)
    end = name.index(".", start)
    idx = int(name[start:end])
    return name[:start] + str(mapping[idx]) + name[end:]


def to_fm_names(state: dict, plan: ProxyPlan) -> dict:
    """Proxy tensor names -> the FM's (layer j -> plan.layer_map[j])."""
    if plan.kind == "neuron":
        return dict(state)
    mapping = dict(enumerate(plan.layer_map))
    return {_layer_rename(k, mapping): v for k, v in state.items()}


def to_proxy_names(state: dict, plan: ProxyPlan) -> dict:
    """FM tensor names -> the proxy's; tensors of dropped layers are left out."""
    if plan.kind == "neuron":
        return dict(state)
    inverse = {fm: j for j, fm in enumerate(plan.layer_map)}
    out = {}
    for k, v in state.items():
        try:
            out[_layer_rename(k, inverse)] = v
        except KeyError:
            continue
    return out


# ----------------------------------------------------------------------------- layer outputs


@contextmanager
def capture_layer_outputs(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, each forward appends every encoder layer's output hidden states."""
    outs: list[Tensor] = []

    def hook(_m: nn.Module, _inp: object, output: object) -> None:
        outs.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[index]

    handles = [layer.register_forward_hook(hook) for layer in encoder_layers(model)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def layer_outputs(model: nn.Module, batch: dict[str, Tensor]) -> list[Tensor]:
    """Every encoder layer's output for `batch` (input_ids, attention_mask[, token_type_ids])."""
    base = unwrap(model)
    with capture_layer_outputs(model) as outs:
        base.encode(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
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
    for batch in batches:
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
        handles.append(named[n].register_hook(lambda g, m=mask: g * m.to(g.dtype)))
    was = proxy.training, fm.training
    proxy.eval()
    fm.eval()
    opt = torch.optim.Adam(train, lr=lr, weight_decay=0.0) if train else None
    losses: list[float] = []
    try:
        for step in range(steps):
            if opt is None:
                break
            batch = next(batches)
            with torch.no_grad():
                f_outs = layer_outputs(fm, batch)
            p_outs = layer_outputs(proxy, batch)
            loss = alignment_loss(p_outs, f_outs, plan, batch.get("attention_mask"))
            loss.backward()
            if max_grad_norm is not None:
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
        inter, out = _ffn(layers[j])
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
                handles.append(layer.intermediate.register_forward_hook(self._hook(j)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, j: int):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, _inp: object, out: Tensor) -> None:
            a = out.detach().float().abs()  # (batch, tokens, neurons)
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
