"""Images as examples, and how they become batches of `pixel_values`.

An `ImageExample` holds its picture as uint8 pixels at the source's resolution ([H, W]
grey or [H, W, 3] RGB). `encode_images` resizes each once to `size` x `size` (bilinear,
Pillow) and keeps it as uint8, so a dataset costs 1 byte per pixel and channel;
`ImageCollator` turns a batch into float `pixel_values` [B, C, size, size]: scaled to
[0, 1], grey repeated to 3 channels (or RGB averaged to 1 for a 1-channel model), then
normalised with the ImageNet mean and standard deviation (3 channels, what DINOv2 and
most ViTs were trained with) or to [-1, 1] (1 channel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from cotune.data.encode import EncodedDataset
from cotune.data.task import Example

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.5,), (0.5,)


@dataclass
class ImageExample(Example):
    """One labelled image: `pixels` uint8 [H, W] (grey) or [H, W, 3] (RGB); `source`
    says where it came from (a file, or `<file>#<index>`). `text_a` is empty."""

    pixels: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), np.uint8), repr=False)
    source: str = ""


def image_example(pixels: np.ndarray, label: int, source: str = "") -> ImageExample:
    return ImageExample(text_a="", text_b=None, label=int(label), pixels=pixels, source=source)


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [C, size, size] (C = 1 grey, 3 RGB), bilinear."""
    image = Image.fromarray(pixels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.array(image, dtype=np.uint8)  # a writable copy (torch.from_numpy)
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def encode_images(examples: Sequence[Example], size: int) -> EncodedDataset:
    """Each example's image resized once to `size` x `size` (uint8): item i is
    {"pixels": uint8 tensor [C, H, W], "labels": int}."""
    items: list[dict[str, Any]] = []
    for ex in examples:
        if not isinstance(ex, ImageExample):
            raise TypeError(f"an image task's examples are ImageExamples, not {type(ex).__name__}")
        items.append({"pixels": torch.from_numpy(resize(ex.pixels, size)), "labels": int(ex.label)})
    return EncodedDataset(items)


class ImageCollator:
    """A batch of resized images -> {"pixel_values" [B, channels, H, W] float32, "labels"}."""

    def __init__(self, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"images have 1 or 3 channels, not {channels}")
        self.channels = channels
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def _channels(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] == self.channels:
            return pixels.float()
        if self.channels == 3:
            return pixels.float().expand(3, -1, -1)
        return pixels.float().mean(dim=0, keepdim=True)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([self._channels(f["pixels"]) for f in features]) / 255.0
        batch = {"pixel_values": (pixels - self.mean) / self.std}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch
