"""SFT on a LoRA model whose FFN input matrix is a LoRA target: the cut layer's matrix is
factorised with its adapters' delta added (the factors then train in full in place of
both), for every family's layout (Linear, GPT-2's Conv1D, Llama's stacked gate and up,
an int8 base under the adapter), and a split run with such targets trains."""

from __future__ import annotations

import pytest
import torch
from helpers import batch_for, inprocess_pair, tiny_cfg

from cotune.config.schema import LoraConfig, ModelConfig
from cotune.models import build_classifier
from cotune.models.cut import cut_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> its FFN input matrices (rows stacked in this order), all LoRA targets here
FFN_IN = {
    "bert": ("intermediate.dense",),
    "gpt2": ("mlp.c_fc",),
    "llama": ("mlp.gate_proj", "mlp.up_proj"),
    "dinov2": ("mlp.fc1",),
}


def _effective(module: torch.nn.Module) -> torch.Tensor:
    """What the LoRA-wrapped module computes with, [out, in], from its own forward."""
    base = module.get_base_layer()
    conv = type(base).__name__ == "Conv1D"  # [in, out]
    eye = torch.eye(base.weight.shape[0] if conv else base.in_features)
    bias = base.bias if base.bias is not None else 0
    return (module(eye) - bias).T


def _delta(module: torch.nn.Module) -> torch.Tensor:
    """The adapter's delta, [out, in]: B A scaled, from its own factors."""
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    return b @ a * module.scaling["default"]


@pytest.mark.parametrize("base_dtype", ["fp32", "int8"])
@pytest.mark.parametrize("family", list(FFN_IN))
def test_full_rank_sft_reproduces_the_adapted_ffn_matrix(family: str, base_dtype: str) -> None:
    lora = LoraConfig(r=4, dropout=0.0, target_modules=list(FFN_IN[family]))
    model, _, _ = build_classifier(
        ModelConfig(name=f"tiny-{family}", lora=lora, base_dtype=base_dtype), 3, seed=0
    )
    torch.manual_seed(5)
    with torch.no_grad():  # a trained adapter: its delta is not zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    modules = dict(model.named_modules())
    wrapped = [
        next(m for n, m in modules.items() if n.endswith(f".2.{rel}")) for rel in FFN_IN[family]
    ]
    with torch.no_grad():
        adapted = torch.cat([_effective(m) for m in wrapped])  # [d_ff (stacked), d]
        plain = torch.cat([_effective(m) - _delta(m) for m in wrapped])
    assert (adapted - plain).abs().max() > 1e-2  # the delta matters: the test is not vacuous

    split = cut_classifier(model, 2, sft_rank=adapted.shape[1])  # full rank
    device_half, cloud_half = split.device.sft, split.cloud.sft
    assert device_half is not None and cloud_half is not None
    rebuilt = cloud_half.U @ torch.diag(device_half.S) @ device_half.V
    torch.testing.assert_close(rebuilt, adapted, atol=1e-4, rtol=0)


def test_split_sft_trains_with_lora_on_every_linear_layer() -> None:
    lora = {"r": 4, "dropout": 0.0, "target_modules": ["all-linear"]}
    cfg = tiny_cfg("bert", model={"lora": lora}, link={"codec": "sft", "rank": 8})
    device, cloud, _ = inprocess_pair(cfg)
    batch = batch_for("bert")
    assert any("lora_A" in n for n in device.named) and any(".sft." in n for n in cloud.named)
    before = {n: p.detach().clone() for n, p in {**device.named, **cloud.named}.items()}
    losses = [device.train_step(batch) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in {**device.named, **cloud.named}.items() if not torch.equal(p, before[n])]
    assert any(".sft." in n for n in moved) and any("lora_" in n for n in moved)
