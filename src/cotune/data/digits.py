"""`digits`: 1,797 grey 8x8 pictures of handwritten digits in 10 classes, the copy of
the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin, C. Kaynak,
1998; CC BY 4.0) that scikit-learn ships inside its wheel (`sklearn.datasets.
load_digits`, read from the installed package: no download).

Its pixels count set bits in 4x4 blocks (0..16); they are scaled to 0..255 uint8.
The set has no split of its own: `task.split_eval` (default 0.2) of each class is held
out with a fixed seed (`SPLIT_SEED`, the same for every run seed). Subsamples as for
every task: `max_train_examples` with the run's seed, `max_eval_examples` with the
fixed seed.

It is a task like any other, and fedpft's default public images for image tasks
(`proxy.public_corpus`): data no client holds, of another kind (handwriting, not
clothes), as bbc-news text is for the text tasks.
"""

from __future__ import annotations

import numpy as np

from cotune.data.images import image_example
from cotune.data.sampling import stratified_split, subsample
from cotune.data.task import Task
from cotune.errors import DataError

NAME = "digits"
KIND = "image-classification"
SOURCE = "scikit-learn's bundled copy of UCI optdigits (sklearn.datasets.load_digits, offline)"
DEFAULT_EVAL_FRACTION = 0.2
SPLIT_SEED = 0
EVAL_SPLIT = "eval"
LEVELS = 16  # a pixel counts the set bits of a 4x4 block


def _images() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "task 'digits' reads the copy of UCI optdigits inside scikit-learn, which is not "
            "installed: pip install scikit-learn"
        ) from None
    data = load_digits()
    pixels = np.rint(np.asarray(data.images) * (255 / LEVELS)).clip(0, 255).astype(np.uint8)
    return pixels, np.asarray(data.target, dtype=np.int64)


def load_digits_task(
    seed: int, max_train: int | None, max_eval: int | None, split_eval: float | None = None
) -> Task:
    pixels, labels = _images()
    fraction = DEFAULT_EVAL_FRACTION if split_eval is None else split_eval
    train_idx, eval_idx = stratified_split(labels.tolist(), fraction, SPLIT_SEED)

    def examples(indices: list[int]) -> list:
        return [
            image_example(pixels[i].copy(), int(labels[i]), f"sklearn-digits#{i}") for i in indices
        ]

    train = subsample(sorted(train_idx), max_train, seed, "train")
    held_out = subsample(sorted(eval_idx), max_eval, SPLIT_SEED, f"eval/{EVAL_SPLIT}")
    return Task(
        name=NAME,
        kind=KIND,
        num_labels=10,
        label_names=[str(d) for d in range(10)],
        train=examples(train),
        eval={EVAL_SPLIT: examples(held_out)},
        primary_metric="accuracy",
        metrics={EVAL_SPLIT: ("accuracy",)},
        source=f"{SOURCE} ({fraction:g} of each class held out)",
    )
