"""What a configuration puts on the device, measured on the model cotune builds for it.

For each candidate the planner builds the real model (the device segment of a split
model, or the whole model for centralized and federated methods), with LoRA and the
`[memory]` option applied as a run applies them, and reads off:

- parameter and trainable counts and the weights' bytes (exact);
- saved-for-backward bytes of one example's forward at the expected padded length
  (`SavedTensorMeter`, exact for that example; a batch saves `batch` times as much);
- FLOPs per token: 2 in x out per Linear forward, the same again for its input gradient
  and for its weight gradient when the weight trains, plus the attention matmuls
  (4 L h forward, 8 L h backward per layer); a checkpointed layer runs its forward twice.

Builds are cached by structure (cut, SFT rank, LoRA); memory options are applied and
removed on the cached build.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from cotune.config import Config
from cotune.memory import SavedTensorMeter, apply_memory_option, remove_memory_option
from cotune.methods.split.protocol import build_split
from cotune.models.classifier import build_classifier
from cotune.models.cut import num_layers


@dataclass(frozen=True)
class PartFlops:
    """FLOPs per token of one side's training step."""

    forward: float
    backward: float

    @property
    def step(self) -> float:
        return self.forward + self.backward


@dataclass(frozen=True)
class DeviceFacts:
    params: int
    trainable: int
    weight_bytes: int
    saved_bytes_per_example: int
    device_flops: PartFlops
    cloud_flops: PartFlops
    cloud_trainable: int
    width: int
    trainable_shapes: dict[str, tuple[int, ...]]


def _unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _weight_bytes(modules: list[nn.Module]) -> int:
    total = sum(p.numel() * p.element_size() for p in _unique_params(modules))
    seen: set[int] = set()
    for m in modules:
        for b in m.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                total += b.numel() * b.element_size()
    return total


def _flops(
    modules: list[nn.Module], attn_layers: int, hidden: int, length: int, recompute: bool
) -> PartFlops:
    fwd = bwd = 0.0
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.Linear) and hasattr(sub, "in_features"):
                f = 2.0 * sub.in_features * sub.out_features
                fwd += f
                bwd += f + (f if sub.weight.requires_grad else 0.0)
    fwd += attn_layers * 4.0 * length * hidden
    bwd += attn_layers * 8.0 * length * hidden
    return PartFlops(forward=fwd, backward=bwd + (fwd if recompute else 0.0))


def example_inputs(length: int, vocab: int = 1000) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, max(6, vocab), (1, length), generator=torch.Generator().manual_seed(0))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(1, length, dtype=torch.long),
        "token_type_ids": torch.zeros(1, length, dtype=torch.long),
    }


class FactFinder:
    """Builds and measures candidates (one build per structure)."""

    def __init__(self, num_labels: int, length: int) -> None:
        self.num_labels = num_labels
        self.length = length
        self._built: dict[tuple[object, ...], object] = {}

    def _key(self, cfg: Config, split: bool) -> tuple[object, ...]:
        lora = cfg.model.lora.model_dump() if cfg.model.lora is not None else None
        rank = cfg.link.rank if cfg.link.codec == "sft" else None
        return (split, cfg.split.cut if split else None, rank, repr(lora), cfg.model.base_dtype)

    def facts(self, cfg: Config, split: bool) -> DeviceFacts:
        key = self._key(cfg, split)
        if key not in self._built:
            if split:
                self._built[key] = build_split(
                    cfg, self.num_labels, "classification", party="device"
                )[0]
            else:
                self._built[key] = build_classifier(cfg.model, self.num_labels, seed=cfg.seed)[0]
        built = self._built[key]
        recompute = cfg.memory.checkpoint or cfg.memory.backward == "checkpoint"
        if split:
            device = built.device  # type: ignore[attr-defined]
            dev_modules: list[nn.Module] = list(built.device_modules())  # type: ignore[attr-defined]
            cloud_modules: list[nn.Module] = list(built.cloud_modules())  # type: ignore[attr-defined]
            hidden = int(built.hidden_size)  # type: ignore[attr-defined]
            width = int(built.width)  # type: ignore[attr-defined]
            dev_layers = len(device.layers) + (1 if device.sft is not None else 0)
            total = int(device.config.num_hidden_layers)
            cloud_layers = total - len(device.layers)
            target: nn.Module = device
        else:
            assert isinstance(built, nn.Module)
            dev_modules, cloud_modules = [built], []
            hidden = int(getattr(built, "hidden_size", 0) or _hidden(built))
            width = 0
            dev_layers, cloud_layers = num_layers(built), 0
            target = built
        params = _unique_params(dev_modules)
        trainable = [p for p in params if p.requires_grad]
        shapes = {
            name: tuple(p.shape)
            for m in dev_modules
            for name, p in m.named_parameters()
            if p.requires_grad
        }
        saved = self._saved(target, cfg, split)
        cloud_params = _unique_params(cloud_modules)
        return DeviceFacts(
            params=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in trainable),
            weight_bytes=_weight_bytes(dev_modules),
            saved_bytes_per_example=saved,
            device_flops=_flops(dev_modules, dev_layers, hidden, self.length, recompute),
            cloud_flops=_flops(cloud_modules, cloud_layers, hidden, self.length, False),
            cloud_trainable=sum(p.numel() for p in cloud_params if p.requires_grad),
            width=width,
            trainable_shapes=shapes,
        )

    def _saved(self, target: nn.Module, cfg: Config, split: bool) -> int:
        apply_memory_option(target, cfg.memory, seed=cfg.seed)
        try:
            inputs = example_inputs(self.length)
            params = [p for p in target.parameters()]
            target.train(True)
            with SavedTensorMeter(params) as meter:
                if split:
                    out, _ = target(**inputs)
                else:
                    out = target(**inputs, labels=torch.zeros(1, dtype=torch.long)).loss
            del out
            return int(meter.peak_bytes)
        finally:
            remove_memory_option(target)
            target.train(False)


def _hidden(model: nn.Module) -> int:
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "hidden_size"):
            return int(cfg.hidden_size)
    raise ValueError("cannot tell the model's hidden size")
