"""Fashion-MNIST (`fashion-mnist`): 28x28 grey pictures of clothes in 10 classes, 60,000
to train and 10,000 to test (Zalando Research, MIT licence).

Offline it comes from the Debian package `dataset-fashion-mnist` (`make setup` installs
it where apt is usable as root), whose IDX files are in `DEFAULT_DIR`; `task.data_dir`
may name another folder holding the four files (plain or `.gz`). `max_train_examples`
subsamples the training set with the run's seed; `max_eval_examples` the test set with
a fixed seed (`EVAL_SEED`), so every seed of a comparison is scored on the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cotune.data.idx import read_idx
from cotune.data.images import image_example
from cotune.data.sampling import subsample
from cotune.data.task import Task
from cotune.errors import DataError

NAME = "fashion-mnist"
KIND = "image-classification"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install dataset-fashion-mnist"
SOURCE = f"Debian package dataset-fashion-mnist ({DEFAULT_DIR}) or task.data_dir (IDX files)"
EVAL_SPLIT = "test"
EVAL_SEED = 0
LABEL_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    EVAL_SPLIT: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) is not in {folder}: install the Debian package "
        f"with `{INSTALL}` (as root), or set task.data_dir to a folder holding the four "
        "IDX files"
    )


def _split(folder: Path, split: str, k: int | None, seed: int, purpose: str) -> list:
    images_file, labels_file = (_find(folder, stem) for stem in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{images_file} and {labels_file} do not hold N images [N, H, W] and N labels "
            f"(shapes {images.shape} and {labels.shape})"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(LABEL_NAMES)):
        raise DataError(f"{labels_file}: labels must be in 0..{len(LABEL_NAMES) - 1}")
    chosen = subsample(list(range(len(labels))), k, seed, purpose)
    return [
        image_example(images[i].astype(np.uint8, copy=True), int(labels[i]),
                      f"{images_file}#{i}")
        for i in chosen
    ]  # fmt: skip


def load_fashion_mnist(
    data_dir: str | None, seed: int, max_train: int | None, max_eval: int | None
) -> Task:
    folder = Path(data_dir or DEFAULT_DIR).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {folder} does not exist: install the Debian package with "
            f"`{INSTALL}` (as root), or set task.data_dir to a folder holding its IDX files"
        )
    return Task(
        name=NAME,
        kind=KIND,
        num_labels=len(LABEL_NAMES),
        label_names=list(LABEL_NAMES),
        train=_split(folder, "train", max_train, seed, "train"),
        eval={EVAL_SPLIT: _split(folder, EVAL_SPLIT, max_eval, EVAL_SEED, f"eval/{EVAL_SPLIT}")},
        primary_metric="accuracy",
        metrics={EVAL_SPLIT: ("accuracy",)},
        source=str(folder),
    )
