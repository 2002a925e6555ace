"""`cotune plan --profile`: the device's training speed in GFLOP/s, measured by timing
the forward and backward of one of the model's own transformer layers (all weights
training) at the plan's batch and length, FLOPs counted as `cotune.planner.facts` counts
them."""

from __future__ import annotations

import time

import torch

from cotune.config import Config
from cotune.models.classifier import build_classifier
from cotune.models.cut import cut_classifier
from cotune.planner.facts import _flops


def profile_gflops(cfg: Config, batch: int, length: int, repeats: int = 5) -> float:
    """Median GFLOP/s of `repeats` timed forward+backward passes of layer 0."""
    model, _, _ = build_classifier(cfg.model.model_copy(update={"lora": None}), 2, seed=cfg.seed)
    split = cut_classifier(model, 1)
    layer = split.device.layers[0]
    layer.train(True)
    for p in layer.parameters():
        p.requires_grad_(True)
    hidden = int(split.hidden_size)
    family, config, shared = split.device.family, split.device.config, split.device.shared
    x = torch.randn(batch, length, hidden, requires_grad=True)
    mask = torch.ones(batch, length, dtype=torch.long)
    flops = _flops([layer], 1, hidden, length, False).step * batch * length
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        ctx = family.context(config, shared, x, mask)
        out = family.run_layer(layer, x, ctx)
        out.float().sum().backward()
        if i:  # the first pass warms up
            times.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    times.sort()
    return flops / times[len(times) // 2] / 1e9
