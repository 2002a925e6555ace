"""`text-folder`: any text classification data set laid out as folders of `.txt` files.

`task.data_dir` holds one sub-folder per class (class names are the folder names,
sorted), each file one example. Either:

- `train/` and `test/` sub-folders, each with the class folders (the test classes must
  be among the train classes): trained on train, scored on test; or
- the class folders directly: a stratified split with a fixed seed (the same for every
  run seed) holds out `task.split_eval` (else `task.test_fraction`) of each class.

Files must be UTF-8; an empty file, a class folder without `.txt` files or fewer than
two classes is a `DataError` naming the folder or file.
"""

from __future__ import annotations

from pathlib import Path

from cotune.config.schema import TaskConfig
from cotune.data.sampling import stratified_split, subsample
from cotune.data.task import Example, Task
from cotune.errors import ConfigError, DataError

NAME = "text-folder"
SOURCE = "task.data_dir: one sub-folder of UTF-8 .txt files per class (or train/ and test/)"
SPLIT_SEED = 0


def class_texts(root: Path, *, strict: bool = True) -> list[tuple[str, str]]:
    """(class, text) pairs from `root/<class>/*.txt`, in sorted order. `strict`: a file
    that is not UTF-8 or holds no text is an error (else undecodable bytes are dropped
    and empty files kept)."""
    pairs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            if not strict:
                pairs.append((folder.name, file.read_text(errors="ignore")))
                continue
            try:
                text = file.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{file}: not UTF-8 text (byte offset {err.start}); save it as UTF-8"
                ) from None
            if not text.strip():
                raise DataError(f"{file} is empty")
            pairs.append((folder.name, text))
    return pairs


def _classes(folder: Path, at_least: int = 2) -> list[tuple[str, str]]:
    pairs = class_texts(folder)
    names = {name for name, _ in pairs}
    empty = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in names)
    if empty:
        raise DataError(f"class folder(s) {', '.join(empty)} in {folder} hold no .txt files")
    if len(names) < at_least:
        raise DataError(
            f"{folder} has {len(names)} class folder(s) with .txt files; text "
            "classification needs at least 2 (one sub-folder of .txt files per class)"
        )
    return pairs


def _task(
    cfg: TaskConfig,
    seed: int,
    names: list[str],
    train_pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]] | None,
    source: str,
) -> Task:
    if cfg.labels is not None:
        names = list(cfg.labels)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({n for n, _ in [*train_pairs, *(eval_pairs or [])]} - set(index))
    if unknown:
        raise DataError(
            f"{source}: class folder(s) {', '.join(unknown)} are not among task.labels "
            f"({', '.join(names)})"
        )

    def examples(pairs: list[tuple[str, str]]) -> list[Example]:
        return [Example(text.strip(), None, index[name]) for name, text in pairs]

    return Task(
        name=NAME,
        kind="classification",
        num_labels=len(names),
        label_names=names,
        train=subsample(examples(train_pairs), cfg.max_train_examples, seed, "train"),
        eval={}
        if eval_pairs is None
        else {
            "eval": subsample(examples(eval_pairs), cfg.max_eval_examples, SPLIT_SEED, "eval/eval")
        },
        primary_metric="accuracy",
        metrics={"eval": ("accuracy", "f1")},
        source=source,
    )


def _folder(cfg: TaskConfig) -> Path:
    if cfg.data_dir is None:
        raise ConfigError(f"task {NAME!r} needs task.data_dir ({SOURCE})")
    folder = Path(cfg.data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"text folder {folder} does not exist")
    return folder


def load_text_folder(cfg: TaskConfig, seed: int, part: str = "all") -> Task:
    """`part` "train": every file of `train/` (or of the class folders) is trained on,
    nothing is held out, one class suffices (a node's own data); "eval": `test/` only
    (no evaluation split without it; no training file is read)."""
    if part == "eval":
        if cfg.data_dir is None or not (_folder(cfg) / "test").is_dir():
            return _task(cfg, seed, list(cfg.labels or []), [], None, "(no test/ folder)")
        test = _folder(cfg) / "test"
        pairs = _classes(test)
        return _task(cfg, seed, sorted({n for n, _ in pairs}), [], pairs, f"{test}")
    folder = _folder(cfg)
    if part == "train":
        root = folder / "train" if (folder / "train").is_dir() else folder
        pairs = _classes(root, at_least=1)
        return _task(cfg, seed, sorted({n for n, _ in pairs}), pairs, None, f"{root}")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train_pairs = _classes(folder / "train")
        names = sorted({name for name, _ in train_pairs})
        eval_pairs = _classes(folder / "test")
        unknown = sorted({name for name, _ in eval_pairs} - set(names))
        if unknown:
            raise DataError(
                f"{folder / 'test'} has classes that train/ lacks: {', '.join(unknown)}"
            )
        how = "train/ and test/"
    else:
        pool = _classes(folder)
        names = sorted({name for name, _ in pool})
        fraction = cfg.split_eval if cfg.split_eval is not None else cfg.test_fraction
        index = {name: i for i, name in enumerate(names)}
        train_idx, eval_idx = stratified_split([index[n] for n, _ in pool], fraction, SPLIT_SEED)
        train_pairs = [pool[i] for i in sorted(train_idx)]
        eval_pairs = [pool[i] for i in sorted(eval_idx)]
        how = f"{fraction:g} of each class held out, seed {SPLIT_SEED}"
    if not eval_pairs:
        raise DataError(f"{folder}: no files left to evaluate on (each class needs 2 or more)")
    return _task(cfg, seed, names, train_pairs, eval_pairs, f"{folder} ({how})")
