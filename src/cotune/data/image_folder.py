"""`image-folder`: any image classification data set laid out as folders.

`task.data_dir` holds one sub-folder per class of PNG / JPEG files (class names are
the folder names, sorted). Either:

- `train/` and `test/` sub-folders, each with the class folders (the test classes must
  be among the train classes): trained on train, scored on test; or
- the class folders directly: a stratified split seeded with a fixed seed
  (`SPLIT_SEED`, the same for every run seed) holds out `task.split_eval` (default 0.2)
  of each class for evaluation.

Subsamples as for every task: `max_train_examples` with the run's seed,
`max_eval_examples` with the fixed seed. Files are decoded with Pillow once the
subsample is drawn; grey images stay grey, any other mode becomes RGB. An unreadable
image is a `DataError` naming the file; fewer than 2 classes is a `DataError` too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cotune.data.images import ImageExample, image_example
from cotune.data.sampling import stratified_split, subsample
from cotune.data.task import Task
from cotune.errors import ConfigError, DataError

NAME = "image-folder"
KIND = "image-classification"
SOURCE = "task.data_dir: one sub-folder of PNG/JPEG files per class (or train/ and test/)"
EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_EVAL_FRACTION = 0.2
SPLIT_SEED = 0


def read_image(path: Path) -> np.ndarray:
    """uint8 [H, W] (grey) or [H, W, 3] (anything else, as RGB)."""
    try:
        with Image.open(path) as image:
            image.load()
            converted = image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    return np.asarray(converted, dtype=np.uint8)


def _class_files(folder: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    found = {
        d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
        for d in classes
    }
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {folder} hold no "
            f"{'/'.join(e.lstrip('.').upper() for e in EXTENSIONS)} files"
        )
    if len(found) < 2:
        raise DataError(
            f"{folder} has {len(found)} class folder(s); image classification needs at "
            "least 2 (one sub-folder of images per class)"
        )
    return found


def _pairs(found: dict[str, list[Path]], index: dict[str, int]) -> list[tuple[Path, int]]:
    return [(f, index[name]) for name, files in found.items() for f in files]


def _examples(pairs: list[tuple[Path, int]]) -> list[ImageExample]:
    return [image_example(read_image(path), label, str(path)) for path, label in pairs]


def load_image_folder(
    data_dir: str | None,
    seed: int,
    max_train: int | None,
    max_eval: int | None,
    split_eval: float | None = None,
) -> Task:
    if data_dir is None:
        raise ConfigError(f"task {NAME!r} needs task.data_dir ({SOURCE})")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train_found = _class_files(folder / "train")
        names = list(train_found)
        index = {name: i for i, name in enumerate(names)}
        test_found = _class_files(folder / "test")
        unknown = sorted(set(test_found) - set(index))
        if unknown:
            raise DataError(
                f"{folder / 'test'} has classes that train/ lacks: {', '.join(unknown)}"
            )
        train_pairs, eval_pairs = _pairs(train_found, index), _pairs(test_found, index)
        how = "train/ and test/"
    else:
        found = _class_files(folder)
        names = list(found)
        pool = _pairs(found, {name: i for i, name in enumerate(names)})
        fraction = DEFAULT_EVAL_FRACTION if split_eval is None else split_eval
        train_idx, eval_idx = stratified_split([lab for _, lab in pool], fraction, SPLIT_SEED)
        train_pairs = [pool[i] for i in sorted(train_idx)]
        eval_pairs = [pool[i] for i in sorted(eval_idx)]
        how = f"{fraction:g} of each class held out"
    if not eval_pairs:
        raise DataError(f"{folder}: no images left to evaluate on (each class needs 2 or more)")
    return Task(
        name=NAME,
        kind=KIND,
        num_labels=len(names),
        label_names=names,
        train=list(_examples(subsample(train_pairs, max_train, seed, "train"))),
        eval={"eval": list(_examples(subsample(eval_pairs, max_eval, SPLIT_SEED, "eval/eval")))},
        primary_metric="accuracy",
        metrics={"eval": ("accuracy",)},
        source=f"{folder} ({how})",
    )
