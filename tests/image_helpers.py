"""Tiny image data sets written into a test's tmp_path: a Fashion-MNIST IDX folder and
an image folder (one sub-folder of PNGs per class). Each class is a distinct pattern,
so a tiny model can learn it in a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cotune.data.idx import write_idx


def class_image(label: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """uint8 [size, size]: a bright horizontal band whose row depends on the label."""
    img = rng.integers(0, 40, (size, size), dtype=np.uint8)
    band = (label * 5) % (size - 4)
    img[band : band + 4] = 230
    return img


def write_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20, classes: int = 10,
                        seed: int = 0) -> Path:  # fmt: skip
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % classes
        images = np.stack([class_image(int(y), rng) for y in labels])
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)  # one plain, one gzip
    return folder


def write_image_folder(folder: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"),
                       per_class: int = 6, seed: int = 0, rgb: bool = True) -> Path:  # fmt: skip
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            grey = class_image(label, rng, size=20)
            pixels = np.stack([grey, grey // 2, 255 - grey], axis=-1) if rgb else grey
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(folder / name / f"{i}.{ext}")
    return folder
