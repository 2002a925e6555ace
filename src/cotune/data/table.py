"""Any data set in rows: `csv` (and `.tsv`), `json` (a JSON array of objects, or JSON
lines) and `hf:<id>` (a `datasets` dataset: from the hub when it is reachable, or a
`save_to_disk` folder given as `task.data_dir`).

The config says which columns hold what: `text_column` (and `text_pair_column` for
pairs), `label_column` for classification and regression, `target_column` for
generation (`problem` defaults to "generation" when a target column is given, else
"classification").

- Classification: the label names are the distinct training labels, sorted (as numbers
  when every one is an integer); a label seen only in the evaluation rows is an error.
  Metrics: accuracy and F1 (binary, or macro over classes).
- Regression: labels must be numbers. Metrics: Pearson and Spearman.
- Generation: training pairs are (text, target) rows; evaluation is per distinct text,
  scored against all of its targets (BLEU, NIST, METEOR, ROUGE-L, CIDEr).

Files: `task.train_file` and `task.eval_file`, or, with only `task.data_dir`, the
`train.*` and `dev.*` / `validation.*` / `test.*` files in it. Without evaluation rows,
a share of the training rows (`task.split_eval`, else `task.test_fraction`) is held
out by a fixed seed, the same for every run seed, so seeds are scored on the same rows
(stratified for classification; by distinct text for generation).

Malformed input is a `DataError` naming the file and line (or item): a missing column,
a ragged CSV row, a non-numeric regression label, an empty file or split, a file that
is not UTF-8.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cotune.config.schema import TaskConfig
from cotune.data.e2e import METRIC_KEYS as GENERATION_METRICS
from cotune.data.e2e import group_by_mr
from cotune.data.sampling import rng_for, stratified_split, subsample
from cotune.data.task import Example, GenerationTask, Task
from cotune.errors import ConfigError, DataError

FILE_TASKS = ("csv", "json")
HF_PREFIX = "hf:"
SOURCE = {
    "csv": "task.train_file (+ task.eval_file): CSV/TSV with a header; columns from task.*_column",
    "json": "task.train_file (+ task.eval_file): JSON array of objects or JSON lines",
}
HF_SOURCE = "hf:<id>: a datasets dataset (hub when reachable, or task.data_dir from save_to_disk)"
SUFFIXES = {"csv": (".csv", ".tsv"), "json": (".jsonl", ".json", ".ndjson")}
EVAL_STEMS = ("dev", "validation", "valid", "test", "eval")
SPLIT_SEED = 0  # the held-out rows do not depend on the run's seed


@dataclass(frozen=True)
class Row:
    """One record and where it came from ("train.csv line 7"), for messages."""

    values: dict[str, Any]
    where: str


# --- reading files -------------------------------------------------------------------


def _decoded(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty: it needs a header (CSV) or records (JSON)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset "
            f"{err.start}); save the file as UTF-8"
        ) from None


def _read_csv(path: Path, text: str) -> list[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"{path} line 1: column name(s) {', '.join(dupes)} repeated")
        rows = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # blank line
            if len(fields) != len(header):
                raise DataError(
                    f"{path} line {reader.line_num}: {len(fields)} field(s) where the header "
                    f"has {len(header)} ({', '.join(header)}); quote a field that holds "
                    f"{delimiter!r} or a line break"
                )
            rows.append(
                Row(dict(zip(header, fields, strict=True)), f"{path} line {reader.line_num}")
            )
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return rows


def _record(obj: Any, where: str) -> Row:
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object (column -> value), got {type(obj).__name__}"
        )
    return Row(obj, where)


def _read_json(path: Path, text: str) -> list[Row]:
    if text.lstrip().startswith("["):  # one JSON array of objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
        rows = [_record(obj, f"{path} item {i}") for i, obj in enumerate(items)]
    else:  # JSON lines
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path} line {n}: invalid JSON ({err.msg}); a JSON lines file holds one "
                    "object per line, a .json file may also hold one array of objects"
                ) from None
            rows.append(_record(obj, f"{path} line {n}"))
    if not rows:
        raise DataError(f"{path} holds no records")
    return rows


def read_rows(path: Path, kind: str) -> list[Row]:
    """The records of a `kind` ("csv" or "json") file, each with its location."""
    if path.suffix.lower() not in SUFFIXES[kind]:
        kinds = "; ".join(f"{k}: {' '.join(v)}" for k, v in SUFFIXES.items())
        raise ConfigError(
            f"{path}: task {kind!r} reads {', '.join(SUFFIXES[kind])} files; for a "
            f"{path.suffix or 'suffix-less'} file set task.name to the matching kind "
            f"({kinds})"
        )
    text = _decoded(path)
    return _read_csv(path, text) if kind == "csv" else _read_json(path, text)


def _find(folder: Path, stems: Sequence[str], kind: str) -> Path | None:
    for stem in stems:
        for suffix in SUFFIXES[kind]:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def _files(cfg: TaskConfig, kind: str) -> tuple[Path, Path | None]:
    if cfg.train_file is not None:
        train = Path(cfg.train_file).expanduser()
    elif cfg.data_dir is not None:
        found = _find(Path(cfg.data_dir).expanduser(), ("train",), kind)
        if found is None:
            raise DataError(
                f"task.data_dir {cfg.data_dir!r} holds no train{'/'.join(SUFFIXES[kind])}; "
                "name the file with task.train_file"
            )
        train = found
    else:
        raise ConfigError(f"task {kind!r} needs task.train_file ({SOURCE[kind]})")
    if cfg.eval_file is not None:
        return train, Path(cfg.eval_file).expanduser()
    if cfg.train_file is None and cfg.data_dir is not None:
        return train, _find(Path(cfg.data_dir).expanduser(), EVAL_STEMS, kind)
    return train, None


# --- rows -> examples ----------------------------------------------------------------


def _value(row: Row, column: str, key: str) -> Any:
    if column not in row.values:
        raise DataError(
            f"{row.where}: no column {column!r} (task.{key}); its columns: "
            f"{', '.join(map(str, row.values)) or '(none)'}"
        )
    return row.values[column]


def _text(row: Row, column: str, key: str) -> str:
    value = _value(row, column, key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{row.where}: column {column!r} (task.{key}) is empty")
    if isinstance(value, dict | list):
        raise DataError(
            f"{row.where}: column {column!r} (task.{key}) holds {type(value).__name__}, not text"
        )
    return str(value).strip()


def _number(row: Row, column: str) -> float:
    value = _value(row, column, "label_column")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(
            f"{row.where}: column {column!r} = {value!r} is not a number "
            "(task.problem = 'regression' needs numeric labels)"
        ) from None
    if not math.isfinite(number):
        raise DataError(f"{row.where}: column {column!r} = {value!r} is not a finite number")
    return number


def label_order(labels: Iterable[str]) -> list[str]:
    """The distinct `labels`, sorted (as numbers when every one is an integer)."""
    names = sorted(set(labels))
    try:
        return sorted(names, key=int)
    except ValueError:
        return names


def _label_names(cfg: TaskConfig, source: str, labels: list[str], part: str) -> list[str]:
    """The class names: `task.labels` when given, else the distinct `labels` in
    order. A node's own data (`part` "train") may hold a single class."""
    if cfg.labels is not None:
        return list(cfg.labels)
    names = label_order(labels)
    if len(names) < 2 and (part == "all" or (part == "eval" and names)):
        raise DataError(
            f"{source}: the {'evaluation' if part == 'eval' else 'training'} rows have "
            f"{len(names)} distinct label(s) ({', '.join(names)}); classification needs at "
            "least 2"
        )
    return names


def problem_of(cfg: TaskConfig) -> str:
    """The task's problem: `task.problem`, else generation when a target column is given."""
    if cfg.problem is not None:
        if cfg.problem == "generation" and cfg.target_column is None:
            raise ConfigError(
                "task.problem = 'generation' needs task.target_column (the text to produce)"
            )
        return cfg.problem
    return "generation" if cfg.target_column is not None else "classification"


def _pair(row: Row, cfg: TaskConfig) -> tuple[str, str | None]:
    pair = cfg.text_pair_column
    return _text(row, cfg.text_column, "text_column"), (
        _text(row, pair, "text_pair_column") if pair is not None else None
    )


def _held_out(n: int, strata: Sequence[int], fraction: float) -> tuple[list[int], list[int]]:
    train, held = stratified_split(list(strata), fraction, SPLIT_SEED)
    if not held:
        raise DataError(
            f"{n} training row(s) leave none to hold out for evaluation; give task.eval_file "
            "or more rows"
        )
    return sorted(train), sorted(held)


def build_task(
    name: str,
    source: str,
    train_rows: list[Row],
    eval_rows: list[Row] | None,
    cfg: TaskConfig,
    seed: int,
    part: str = "all",
) -> Task:
    """The task from training rows and evaluation rows (None: hold some training rows
    out, by a fixed seed). `part` "train": every training row is trained on and there
    is no evaluation split; "eval": only the evaluation rows (none: no split)."""
    problem = problem_of(cfg)
    fraction = cfg.split_eval if cfg.split_eval is not None else cfg.test_fraction
    if part != "eval" and not train_rows:
        raise DataError(f"{source}: no training rows")
    if eval_rows is not None and not eval_rows:
        raise DataError(f"{source}: no evaluation rows")
    if problem == "generation":
        return _generation(name, source, train_rows, eval_rows, cfg, seed, fraction, part)
    texts = [_pair(r, cfg) for r in train_rows]
    if problem == "regression":
        labels: list[Any] = [_number(r, cfg.label_column) for r in train_rows]
        names = [cfg.label_column]
        strata = [0] * len(labels)
    else:
        raw = [_text(r, cfg.label_column, "label_column") for r in train_rows]
        seen = raw
        if part == "eval":
            seen = [_text(r, cfg.label_column, "label_column") for r in eval_rows or []]
        names = _label_names(cfg, source, seen, part)
        index = {n: i for i, n in enumerate(names)}
        for row, value in zip(train_rows, raw, strict=True):
            if value not in index:
                raise DataError(
                    f"{row.where}: label {value!r} is not one of task.labels ({', '.join(names)})"
                )
        labels = [index[v] for v in raw]
        strata = labels
    examples = [Example(a, b, y) for (a, b), y in zip(texts, labels, strict=True)]
    evals: list[Example] | None
    if part == "train":
        train, evals = examples, None
    elif eval_rows is None:
        if part == "eval":  # held-out rows are training rows: none without an eval file
            train, evals = [], None
        else:
            train_idx, held_idx = _held_out(len(examples), strata, fraction)
            train, evals = [examples[i] for i in train_idx], [examples[i] for i in held_idx]
            source += f" ({fraction:g} held out for evaluation, seed {SPLIT_SEED})"
    else:
        train, evals = examples, [_eval_example(r, cfg, problem, names) for r in eval_rows]
    metrics = ("pearson", "spearman") if problem == "regression" else ("accuracy", "f1")
    return Task(
        name=name,
        kind=problem,
        num_labels=1 if problem == "regression" else len(names),
        label_names=names,
        train=subsample(train, cfg.max_train_examples, seed, "train"),
        eval={}
        if evals is None
        else {"eval": subsample(evals, cfg.max_eval_examples, SPLIT_SEED, "eval/eval")},
        primary_metric=metrics[0] if problem == "classification" else "spearman",
        metrics={"eval": metrics},
        source=source,
    )


def _eval_example(row: Row, cfg: TaskConfig, problem: str, names: list[str]) -> Example:
    a, b = _pair(row, cfg)
    if problem == "regression":
        return Example(a, b, _number(row, cfg.label_column))
    label = _text(row, cfg.label_column, "label_column")
    if label not in names:
        raise DataError(
            f"{row.where}: label {label!r} appears in the evaluation rows but never in "
            f"training (training labels: {', '.join(names)}); a model cannot predict it"
        )
    return Example(a, b, names.index(label))


def _generation(
    name: str,
    source: str,
    train_rows: list[Row],
    eval_rows: list[Row] | None,
    cfg: TaskConfig,
    seed: int,
    fraction: float,
    part: str = "all",
) -> GenerationTask:
    target = cfg.target_column
    assert target is not None  # problem_of checked it

    def pairs(rows: list[Row]) -> list[tuple[str, str]]:
        return [
            (_text(r, cfg.text_column, "text_column"), _text(r, target, "target_column"))
            for r in rows
        ]

    train_pairs = pairs(train_rows)
    if part == "train" or (part == "eval" and eval_rows is None):
        eval_pairs: list[tuple[str, str]] = []
    elif eval_rows is None:  # hold out whole prompts: none is both trained on and scored
        prompts, _ = group_by_mr(train_pairs)
        held_idx = _held_out(len(prompts), [0] * len(prompts), fraction)[1]
        held = {prompts[i] for i in held_idx}
        eval_pairs = [p for p in train_pairs if p[0] in held]
        train_pairs = [p for p in train_pairs if p[0] not in held]
        source += f" ({fraction:g} of the distinct texts held out, seed {SPLIT_SEED})"
    else:
        eval_pairs = pairs(eval_rows)
    prompts, refs = group_by_mr(eval_pairs) if eval_pairs else ([], [])
    keep = list(range(len(prompts)))
    if cfg.max_eval_examples is not None and cfg.max_eval_examples < len(prompts):
        chosen = rng_for(SPLIT_SEED, "eval/eval").choice(
            len(prompts), cfg.max_eval_examples, replace=False
        )
        keep = sorted(int(i) for i in np.asarray(chosen))
    train = [Example(p, t, 0) for p, t in train_pairs]
    return GenerationTask(
        name=name,
        kind="generation",
        num_labels=0,
        label_names=[],
        train=subsample(train, cfg.max_train_examples, seed, "train"),
        eval={"eval": [Example(prompts[i], None, 0) for i in keep]} if eval_pairs else {},
        primary_metric="bleu",
        metrics={"eval": GENERATION_METRICS},
        source=source,
        references={"eval": [refs[i] for i in keep]} if eval_pairs else {},
    )


# --- the three sources ---------------------------------------------------------------


def _eval_path(cfg: TaskConfig, kind: str) -> Path | None:
    """The evaluation file alone (`task.eval_file`, else `dev.*` / ... in
    `task.data_dir`), found without reading or even locating the training file."""
    if cfg.eval_file is not None:
        return Path(cfg.eval_file).expanduser()
    if cfg.data_dir is not None:
        return _find(Path(cfg.data_dir).expanduser(), EVAL_STEMS, kind)
    return None


def load_file_task(kind: str, cfg: TaskConfig, seed: int, part: str = "all") -> Task:
    """`csv` / `json`: rows from `task.train_file` (+ `task.eval_file`) or `task.data_dir`.
    `part` "train": the training rows only, all trained on; "eval": the evaluation file
    only (the training file is never opened)."""
    problem_of(cfg)  # a config error before any file is read
    if part == "eval":
        eval_path = _eval_path(cfg, kind)
        eval_rows = read_rows(eval_path, kind) if eval_path is not None else None
        source = str(eval_path) if eval_path is not None else "(no evaluation file)"
        return build_task(kind, source, [], eval_rows, cfg, seed, part)
    train_path, eval_path = _files(cfg, kind)
    if part == "train":
        eval_path = None
    train_rows = read_rows(train_path, kind)
    eval_rows = read_rows(eval_path, kind) if eval_path is not None else None
    source = str(train_path) + (f" + {eval_path}" if eval_path is not None else "")
    return build_task(kind, source, train_rows, eval_rows, cfg, seed, part)


def load_hf_task(name: str, cfg: TaskConfig, seed: int, part: str = "all") -> Task:
    """`hf:<id>`: `datasets.load_from_disk(task.data_dir)` when given, else the hub.
    `part` "train": the train split only, all trained on; "eval": the evaluation split
    only (none without one)."""
    problem_of(cfg)
    dataset_id = name[len(HF_PREFIX) :].strip()
    if not dataset_id:
        raise ConfigError("task.name 'hf:' names no dataset; write hf:<id>, e.g. hf:imdb")
    try:
        import datasets
    except ImportError:
        raise ConfigError("hf:<id> tasks need the datasets package: pip install datasets") from None
    if cfg.data_dir is not None:
        folder = Path(cfg.data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"task.data_dir {str(folder)!r} is not a folder (a datasets save_to_disk folder)"
            )
        try:
            loaded = _from_disk(datasets, folder, cfg, part)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{folder} is not a datasets save_to_disk folder: {err}") from None
        source = f"{folder} (datasets.load_from_disk)"
    else:
        from cotune.hub import datasets_unavailable

        reason = datasets_unavailable()
        if reason is not None:
            raise DataError(
                f"hf:{dataset_id} cannot be downloaded ({reason}); save it with "
                "datasets' save_to_disk where the hub is reachable and give that folder as "
                "task.data_dir"
            )
        try:
            loaded = datasets.load_dataset(dataset_id)
        except Exception as err:  # the hub's errors are many; the message is what counts
            raise DataError(f"loading hf:{dataset_id} from the hub failed: {err}") from None
        source = f"hf:{dataset_id}"
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    if "train" not in loaded and part != "eval":
        raise DataError(f"{source} has no 'train' split; its splits: {', '.join(loaded)}")
    eval_split = cfg.eval_split or next((s for s in ("validation", "test") if s in loaded), None)
    if eval_split is not None and eval_split not in loaded:
        raise ConfigError(
            f"task.eval_split {eval_split!r} is not a split of {source}; its splits: {', '.join(loaded)}"
        )

    def rows(split: str) -> list[Row]:
        return [
            Row(dict(r), f"{source} split {split!r} row {i}") for i, r in enumerate(loaded[split])
        ]

    eval_rows = rows(eval_split) if eval_split is not None and part != "train" else None
    train_rows = rows("train") if part != "eval" else []
    task = build_task(name, source, train_rows, eval_rows, cfg, seed, part)
    split = "train" if part != "eval" else eval_split
    class_label = loaded[split].features.get(cfg.label_column) if split in loaded else None
    # with task.labels (or a node's raw labels, which its server unites) the labels stay
    # as the column holds them, so every party maps them alike
    named = cfg.labels is None and part == "all"
    if named and isinstance(class_label, datasets.ClassLabel) and task.kind == "classification":
        _name_classes(task, class_label.names)
    return task


def _from_disk(datasets: Any, folder: Path, cfg: TaskConfig, part: str) -> Any:
    """`datasets.load_from_disk(folder)`; for the evaluation part of a DatasetDict
    folder its evaluation split's folder alone, so no training file is opened."""
    index = folder / "dataset_dict.json"
    if part != "eval" or not index.is_file():
        return datasets.load_from_disk(str(folder))
    splits = [str(s) for s in json.loads(index.read_text()).get("splits", [])]
    split = cfg.eval_split or next((s for s in ("validation", "test") if s in splits), None)
    if split is None or split not in splits:
        return datasets.DatasetDict({})  # no evaluation split (a wrong eval_split is named below)
    return datasets.DatasetDict({split: datasets.load_from_disk(str(folder / split))})


def _name_classes(task: Task, names: list[str]) -> None:
    """A ClassLabel column's integer labels -> its class names (when they are indices)."""
    try:
        task.label_names = [names[int(n)] for n in task.label_names]
    except (ValueError, IndexError):
        pass
