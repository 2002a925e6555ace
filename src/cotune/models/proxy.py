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

How the proxy is aligned to the FM and which neurons it re-aligns is fedpft's own work
(`cotune.methods.fedpft.alignment`); this module only builds proxies and maps names.

Supported families (`FFN_LAYOUTS`, recognised by a layer's structure): BERT-style
encoders (`bert`, `roberta`: `encoder.layer[i]` with `intermediate.dense`,
`output.dense`, post-FFN `output.LayerNorm`) and DINOv2 ViTs (`dinov2`:
`encoder.layer[i]` with `mlp.fc1`, `mlp.fc2`, pre-FFN `norm2` and `layer_scale2`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cotune.config.schema import ProxyConfig
from cotune.errors import ModelError
from cotune.models.lora import unwrap
from cotune.models.zoo import resolve

if TYPE_CHECKING:
    from cotune.models.cut import HFModule

# Every attention projection (query, key, value, output) of each family with proxies:
# fedpft's default LoRA targets.
ATTENTION_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "attention.output.dense"),
    "roberta": ("query", "key", "value", "attention.output.dense"),
    "dinov2": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
PROXY_FAMILIES: tuple[str, ...] = tuple(ATTENTION_PROJECTIONS)


@dataclass(frozen=True)
class FFNLayout:
    """Where a family's FFN sits inside one encoder layer (module paths): `inner` is
    the linear d -> d_ff whose output rows are the neurons, `outer` the linear d_ff -> d,
    and `branch` the norm and scale that alignment trains with the FFN (BERT's
    post-FFN LayerNorm; DINOv2's pre-FFN `norm2` and its `layer_scale2`)."""

    name: str
    inner: str
    outer: str
    branch: tuple[str, ...]


FFN_LAYOUTS: tuple[FFNLayout, ...] = (
    FFNLayout("BERT", "intermediate.dense", "output.dense", ("output.LayerNorm",)),
    FFNLayout("DINOv2", "mlp.fc1", "mlp.fc2", ("norm2", "layer_scale2")),
)


# ----------------------------------------------------------------------------- structure


def proxy_family(name: str) -> str:
    """The family of model `name` (zoo name, folder or hub id; nothing is converted or
    loaded), a `ModelError` unless proxies of it can be built."""
    family = resolve(name, prepare=False).family
    if family not in PROXY_FAMILIES:
        raise ModelError(
            f"model {name!r} is {'an' if family[0] in 'aeiou' else 'a'} {family} model; proxies "
            "(fedpft) are built from "
            f"{', '.join(PROXY_FAMILIES)} encoders only"
        )
    return family


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's layer list of a (peft-wrapped) SequenceClassifier or base model."""
    base = unwrap(model)
    backbone = getattr(base, "backbone", base)
    encoder = getattr(backbone, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        family = getattr(base, "family", type(backbone).__name__)
        raise ModelError(
            f"proxy construction needs an encoder with a layer list (encoder.layer[i]); this "
            f"model ({family}) has none. Families with proxies: {', '.join(PROXY_FAMILIES)}"
        )
    return layers


def ffn_layout(layer: nn.Module) -> FFNLayout:
    """The `FFNLayout` of an encoder layer (the first whose two linears it has)."""
    for layout in FFN_LAYOUTS:
        try:
            inner, outer = layer.get_submodule(layout.inner), layer.get_submodule(layout.outer)
        except AttributeError:
            continue
        if isinstance(inner, nn.Linear) and isinstance(outer, nn.Linear):
            return layout
    known = "; ".join(f"{lay.name}: {lay.inner} + {lay.outer}" for lay in FFN_LAYOUTS)
    raise ModelError(
        f"proxy construction needs an FFN of two plain linear layers ({known}); this "
        f"{type(layer).__name__} has none (LoRA on the FFN's linears is not supported). "
        f"Families with proxies: {', '.join(PROXY_FAMILIES)}"
    )


def ffn_linears(layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(inner d -> d_ff, outer d_ff -> d) linears of an encoder layer's FFN."""
    layout = ffn_layout(layer)
    inner, outer = layer.get_submodule(layout.inner), layer.get_submodule(layout.outer)
    assert isinstance(inner, nn.Linear) and isinstance(outer, nn.Linear)
    return inner, outer


def ffn_size(model: nn.Module, layer: int) -> int:
    return ffn_linears(encoder_layers(model)[layer])[0].out_features


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
    inter, out = ffn_linears(layer)
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
    inter, out = ffn_linears(layer)
    w_in = inter.weight.detach().float()  # (d_ff, d)
    w_out = out.weight.detach().float()  # (d, d_ff)
    return (w_in.pow(2).sum(dim=1) + w_out.pow(2).sum(dim=0)).sqrt()


def _linear_like(src: nn.Linear, in_f: int, out_f: int) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=src.bias is not None)
    return lin.to(dtype=src.weight.dtype, device=src.weight.device)


def shrink_ffn(layer: nn.Module, neurons: Tensor) -> None:
    """Keep only FFN neurons `neurons` (sorted indices) of `layer`, in place."""
    inter, out = ffn_linears(layer)
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
    layout = ffn_layout(layer)
    layer.set_submodule(layout.inner, new_in)
    layer.set_submodule(layout.outer, new_out)


def top_neurons(layer: nn.Module, m: int) -> Tensor:
    """Indices (ascending) of the m most salient FFN neurons of `layer`."""
    sal = neuron_saliency(layer)
    return torch.topk(sal, m).indices.sort().values


def _apply_plan(proxy: nn.Module, plan: ProxyPlan, neurons: dict[int, Tensor]) -> None:
    layers = encoder_layers(proxy)
    if plan.kind == "layer_drop":
        kept = nn.ModuleList([layers[i] for i in plan.layer_map])
        parent: HFModule = unwrap(proxy)
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
    """Names of the compressed layers' FFN parameters (and the modules of its branch:
    its LayerNorm, a layer scale; `FFNLayout.branch`)."""
    wanted = []
    layers = encoder_layers(proxy)
    for j, compressed in enumerate(plan.compressed):
        if compressed:
            layout = ffn_layout(layers[j])
            parts = [layout.inner, layout.outer, *(layout.branch if norm else ())]
            wanted += [f"layer.{j}.{p}." for p in parts]
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
