"""The nine GLUE tasks: from a folder in GLUE TSV layout, or from the HF hub when the user
opts in (HF_DATASETS_OFFLINE=0).

GLUE test sets carry no labels, so the evaluation split is dev (MNLI: dev_matched and
dev_mismatched). Label indices follow the HF hub's `nyu-mll/glue` so both sources agree.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cotune import hub
from cotune.data.task import Example
from cotune.errors import DataError

SHARED_HINT = "../shared/data/glue has SST-2 (train and dev) and QNLI (dev only)"


@dataclass(frozen=True)
class GlueSpec:
    key: str  # "sst2"
    folder: str  # the folder name GLUE's download script uses, for messages
    header: tuple[str, ...] | None  # columns the header must name; None: the file has none
    n_columns: int | None  # column count of a header-less file
    text_a: str | int  # header name, or column index when there is no header
    text_b: str | int | None
    label: str | int
    label_names: tuple[str, ...]
    label_values: tuple[str, ...] | None  # label strings in the file by index; None: float score
    eval_files: tuple[tuple[str, str], ...]  # (split, file name)
    metrics: tuple[tuple[str, tuple[str, ...]], ...]  # (split, metric keys)
    primary_metric: str
    hf_config: str
    hf_columns: tuple[str, str | None]
    hf_eval_splits: tuple[str, ...]  # parallel to eval_files

    @property
    def name(self) -> str:
        return f"glue/{self.key}"

    @property
    def kind(self) -> Literal["classification", "regression"]:
        return "regression" if self.label_values is None else "classification"


def _spec(key: str, folder: str, **kw: Any) -> GlueSpec:
    kw.setdefault("header", None)
    kw.setdefault("n_columns", None)
    kw.setdefault("text_b", None)
    kw.setdefault("eval_files", (("eval", "dev.tsv"),))
    kw.setdefault("hf_eval_splits", ("validation",))
    kw.setdefault("metrics", (("eval", ("accuracy",)),))
    kw.setdefault("primary_metric", "accuracy")
    return GlueSpec(key=key, folder=folder, hf_config=key, **kw)


BINARY = ("0", "1")
ENTAIL = ("entailment", "not_entailment")

GLUE_SPECS: dict[str, GlueSpec] = {
    s.key: s
    for s in (
        _spec(
            "cola",
            "CoLA",
            n_columns=4,  # source, label, original label, sentence
            text_a=3,
            label=1,
            label_names=("unacceptable", "acceptable"),
            label_values=BINARY,
            metrics=(("eval", ("mcc",)),),
            primary_metric="mcc",
            hf_columns=("sentence", None),
        ),
        _spec(
            "sst2",
            "SST-2",
            header=("sentence", "label"),
            text_a="sentence",
            label="label",
            label_names=("negative", "positive"),
            label_values=BINARY,
            hf_columns=("sentence", None),
        ),
        _spec(
            "mrpc",
            "MRPC",
            header=("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            text_a="#1 String",
            text_b="#2 String",
            label="Quality",
            label_names=("not_equivalent", "equivalent"),
            label_values=BINARY,
            metrics=(("eval", ("f1", "accuracy")),),
            primary_metric="f1",
            hf_columns=("sentence1", "sentence2"),
        ),
        _spec(
            "qqp",
            "QQP",
            header=("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
            text_a="question1",
            text_b="question2",
            label="is_duplicate",
            label_names=("not_duplicate", "duplicate"),
            label_values=BINARY,
            metrics=(("eval", ("f1", "accuracy")),),
            primary_metric="f1",
            hf_columns=("question1", "question2"),
        ),
        _spec(
            "stsb",
            "STS-B",
            header=("sentence1", "sentence2", "score"),
            text_a="sentence1",
            text_b="sentence2",
            label="score",
            label_names=("similarity",),
            label_values=None,
            metrics=(("eval", ("pearson", "spearman")),),
            primary_metric="spearman",
            hf_columns=("sentence1", "sentence2"),
        ),
        _spec(
            "mnli",
            "MNLI",
            header=("sentence1", "sentence2", "gold_label"),
            text_a="sentence1",
            text_b="sentence2",
            label="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            label_values=("entailment", "neutral", "contradiction"),
            eval_files=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
            hf_eval_splits=("validation_matched", "validation_mismatched"),
            metrics=(("matched", ("accuracy",)), ("mismatched", ("accuracy_mm",))),
            hf_columns=("premise", "hypothesis"),
        ),
        _spec(
            "qnli",
            "QNLI",
            header=("index", "question", "sentence", "label"),
            text_a="question",
            text_b="sentence",
            label="label",
            label_names=ENTAIL,
            label_values=ENTAIL,
            hf_columns=("question", "sentence"),
        ),
        _spec(
            "rte",
            "RTE",
            header=("index", "sentence1", "sentence2", "label"),
            text_a="sentence1",
            text_b="sentence2",
            label="label",
            label_names=ENTAIL,
            label_values=ENTAIL,
            hf_columns=("sentence1", "sentence2"),
        ),
        _spec(
            "wnli",
            "WNLI",
            header=("index", "sentence1", "sentence2", "label"),
            text_a="sentence1",
            text_b="sentence2",
            label="label",
            label_names=("not_entailment", "entailment"),
            label_values=BINARY,
            hf_columns=("sentence1", "sentence2"),
        ),
    )
}


def expected_files(spec: GlueSpec) -> list[str]:
    return ["train.tsv", *(f for _, f in spec.eval_files)]


def _parse_label(spec: GlueSpec, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if spec.label_values is None:
        try:
            score = float(raw)
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:  # also rejects nan
            raise DataError(f"{where}: label {raw!r} is not a similarity score from 0 to 5")
        return score
    try:
        return spec.label_values.index(raw)
    except ValueError:
        valid = ", ".join(spec.label_values)
        raise DataError(f"{where}: label {raw!r} is not one of: {valid}") from None


def read_tsv(spec: GlueSpec, path: Path) -> list[Example]:
    """Read one labelled GLUE TSV file; any malformed row is a DataError naming its line."""
    examples: list[Example] = []
    # utf-8-sig drops MRPC's byte-order mark; QUOTE_NONE because sentences contain `"`.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.header is None:
            n_columns = spec.n_columns
            # a header-less spec gives its columns by index, a spec with a header by name
            assert isinstance(spec.text_a, int) and isinstance(spec.label, int)
            assert spec.text_b is None or isinstance(spec.text_b, int)
            col_a, col_b, col_label = spec.text_a, spec.text_b, spec.label
            layout = f"{n_columns} tab-separated columns and no header"
        else:
            header = next(reader, None)
            if header is None:
                raise DataError(
                    f"{path} is empty; expected a header naming {', '.join(spec.header)}"
                )
            header = [h.strip() for h in header]
            missing = [h for h in spec.header if h not in header]
            if missing:
                raise DataError(
                    f"{path} line 1: header {header} lacks column(s) {missing}; a {spec.folder} "
                    f"file in GLUE layout has a header naming {', '.join(spec.header)}"
                )
            n_columns = len(header)
            assert isinstance(spec.text_a, str) and isinstance(spec.label, str)
            assert spec.text_b is None or isinstance(spec.text_b, str)
            col_a = header.index(spec.text_a)
            col_b = None if spec.text_b is None else header.index(spec.text_b)
            col_label = header.index(spec.label)
            layout = f"{n_columns} tab-separated columns like its header"
        for row in reader:
            if not row:
                continue  # blank line
            where = f"{path} line {reader.line_num}"
            if len(row) != n_columns:
                raise DataError(f"{where}: found {len(row)} columns, expected {layout}")
            label = _parse_label(spec, row[col_label], where)
            text_b = None if col_b is None else row[col_b].strip()
            examples.append(Example(row[col_a].strip(), text_b, label))
    if not examples:
        raise DataError(f"{path} has no data rows")
    return examples


def load_folder(
    spec: GlueSpec,
    data_dir: str,
    require_train: bool,
    *,
    read_train: bool = True,
    read_eval: bool = True,
) -> tuple[list[Example], dict[str, list[Example]]]:
    """Train examples and evaluation splits from a folder in GLUE TSV layout (without
    `read_train` train.tsv is never opened; without `read_eval` nor are the evaluation
    files, and no evaluation split is returned)."""
    root = Path(data_dir).expanduser()
    wanted = ", ".join(expected_files(spec))
    if not root.is_dir():
        raise DataError(
            f"task.data_dir {str(root)!r} is not a folder; {spec.name} needs a folder in GLUE "
            f"TSV layout holding {wanted} ({SHARED_HINT})"
        )
    train_path = root / "train.tsv"
    needed = [root / f for _, f in spec.eval_files] if read_eval else []
    if require_train:
        needed.insert(0, train_path)
    absent = [p.name for p in needed if not p.is_file()]
    if absent:
        raise DataError(
            f"task.data_dir {str(root)!r} lacks {', '.join(absent)}; {spec.name} needs a folder "
            f"in GLUE TSV layout holding {wanted}"
            + (" (QNLI's train.tsv is not in ../shared/data)" if spec.key == "qnli" else "")
        )
    train = read_tsv(spec, train_path) if read_train and train_path.is_file() else []
    evals = {split: read_tsv(spec, root / f) for split, f in spec.eval_files} if read_eval else {}
    return train, evals


def _hub_unavailable() -> str | None:
    """Why the hub copy of a packaged task cannot be used here, or None if it can (the
    task does not name a hub data set: it stays offline unless the user opts in)."""
    return hub.datasets_unavailable(named=False)


def load_hub(spec: GlueSpec, require_train: bool) -> tuple[list[Example], dict[str, list[Example]]]:
    """Train examples and evaluation splits of `nyu-mll/glue` from the HF hub."""
    reason = _hub_unavailable()
    if reason is not None:
        raise DataError(
            f"{spec.name} needs task.data_dir: a folder in GLUE TSV layout holding "
            f"{', '.join(expected_files(spec))} (the HF hub cannot be used: {reason}). "
            f"{SHARED_HINT}."
        )
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.hf_config)
    except Exception as exc:  # any hub or cache failure is a data problem for the user
        raise DataError(
            f"loading {spec.name} from the HF hub (nyu-mll/glue, {spec.hf_config}) failed: "
            f"{exc}. Give task.data_dir: a folder in GLUE TSV layout holding "
            f"{', '.join(expected_files(spec))}."
        ) from exc

    def convert(split: str) -> list[Example]:
        part = ds[split]
        col_a, col_b = spec.hf_columns
        texts_b = part[col_b] if col_b is not None else [None] * len(part)
        cast = float if spec.label_values is None else int
        return [
            Example(a, b, cast(y))
            for a, b, y in zip(part[col_a], texts_b, part["label"], strict=True)
        ]

    train = convert("train") if "train" in ds else []
    if require_train and not train:
        raise DataError(f"the HF hub copy of {spec.name} has no train split")
    evals = {
        split: convert(hf_split)
        for (split, _), hf_split in zip(spec.eval_files, spec.hf_eval_splits, strict=True)
    }
    return train, evals
