"""The E2E NLG Challenge task (`e2e`): restaurant meaning representations -> text.

A folder in the official layout holds `trainset.csv` and `testset_w_refs.csv` (and
optionally `devset.csv`), CSV with columns `mr,ref` and one row per (MR, reference):
an MR has several references in every split. Training pairs are the rows (prompt =
MR, target = reference). Evaluation is per MR: one generated text scored against all
of its references (`cotune.data.e2e_metrics`), as the official e2e-metrics do.

`max_train_examples` subsamples training rows; `max_eval_examples` subsamples MRs (the
unit of evaluation) with every one of their references kept.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from cotune.data.sampling import rng_for, subsample
from cotune.data.task import Example, GenerationTask
from cotune.errors import ConfigError, DataError

NAME = "e2e"
SOURCE = "task.data_dir (folder with trainset.csv, testset_w_refs.csv; e.g. ../shared/data/e2e)"
SHARED_HINT = "../shared/data/e2e holds the official E2E NLG release"
FILES = {"train": "trainset.csv", "test": "testset_w_refs.csv", "dev": "devset.csv"}
EVAL_SPLIT = "test"
METRIC_KEYS = ("bleu", "nist", "meteor", "rouge_l", "cider")
EAT_TYPES = ("pub", "coffee shop", "restaurant")  # label = index, 3 = not given

_EAT_TYPE = re.compile(r"eatType\[([^\]]*)\]")


def eat_type_label(mr: str) -> int:
    """A coarse class per MR (its eatType), so label-based partitioners can go non-IID."""
    m = _EAT_TYPE.search(mr)
    value = m.group(1).strip().lower() if m else ""
    return EAT_TYPES.index(value) if value in EAT_TYPES else len(EAT_TYPES)


def read_csv(path: Path) -> list[tuple[str, str]]:
    """(mr, ref) rows of an E2E CSV file (header `mr,ref`, any case)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["mr", "ref"]:
            raise DataError(f"{path}: expected a header 'mr,ref', found {header!r}")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) < 2:
                raise DataError(f"{path} line {reader.line_num}: expected 2 columns (mr, ref)")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise DataError(f"{path} has no data rows")
    return rows


def group_by_mr(rows: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Distinct MRs in order of first appearance, and each one's references."""
    refs: dict[str, list[str]] = {}
    for mr, ref in rows:
        refs.setdefault(mr, []).append(ref)
    return list(refs), list(refs.values())


def _load_hub() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    from cotune.data.glue import _hub_unavailable

    reason = _hub_unavailable()
    if reason is not None:
        raise DataError(
            f"e2e needs task.data_dir: a folder holding {FILES['train']} and {FILES['test']} "
            f"(the HF hub cannot be used: {reason}). {SHARED_HINT}."
        )
    import datasets

    try:
        ds = datasets.load_dataset("tuetschek/e2e_nlg")
    except Exception as exc:
        raise DataError(
            f"loading e2e from the HF hub (tuetschek/e2e_nlg) failed: {exc}. Give "
            f"task.data_dir: a folder holding {FILES['train']} and {FILES['test']}."
        ) from exc

    def rows(split: str) -> list[tuple[str, str]]:
        part = ds[split]
        return list(zip(part["meaning_representation"], part["human_reference"], strict=True))

    return rows("train"), rows("test")


def load_e2e(
    data_dir: str | None,
    seed: int,
    max_train_examples: int | None,
    max_eval_examples: int | None,
    *,
    require_train: bool = True,
    part: str = "all",
) -> GenerationTask:
    """The E2E task from `data_dir` (or the HF hub when the user opts in:
    HF_DATASETS_OFFLINE=0), seeded subsamples. `part` "train": the training file only (no
    evaluation split); "eval": the test file only (the training file is never opened)."""
    if data_dir is None and part != "all":
        raise ConfigError(
            f"e2e as a node's own data (or a server without training data) needs "
            f"task.data_dir: a folder holding {FILES['train']} (node) or {FILES['test']} "
            "(server)"
        )
    if data_dir is None:
        train_rows, test_rows = _load_hub()
        source = "hf:tuetschek/e2e_nlg"
    else:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(
                f"task.data_dir {str(root)!r} is not a folder; e2e needs a folder holding "
                f"{FILES['train']} and {FILES['test']} ({SHARED_HINT})"
            )
        needed = {
            "all": [FILES["test"]] + ([FILES["train"]] if require_train else []),
            "train": [FILES["train"]],
            "eval": [FILES["test"]],
        }[part]
        absent = [f for f in needed if not (root / f).is_file()]
        if absent:
            raise DataError(
                f"task.data_dir {str(root)!r} lacks {', '.join(absent)}; e2e needs "
                f"{FILES['train']} and {FILES['test']} (CSV, columns mr,ref)"
            )
        train_path = root / FILES["train"]
        read_train = part != "eval" and train_path.is_file()
        train_rows = read_csv(train_path) if read_train else []
        test_rows = read_csv(root / FILES["test"]) if part != "train" else []
        source = str(root)
    train = [Example(mr, ref, eat_type_label(mr)) for mr, ref in train_rows]
    mrs, refs = group_by_mr(test_rows)
    keep = list(range(len(mrs)))
    if max_eval_examples is not None and max_eval_examples < len(mrs):
        keep = sorted(
            int(i)
            for i in rng_for(seed, f"eval/{EVAL_SPLIT}").choice(
                len(mrs), size=max_eval_examples, replace=False
            )
        )
    return GenerationTask(
        name=NAME,
        kind="generation",
        num_labels=0,
        label_names=[],
        train=subsample(train, max_train_examples, seed, "train"),
        eval={EVAL_SPLIT: [Example(mrs[i], None, eat_type_label(mrs[i])) for i in keep]}
        if part != "train"
        else {},
        primary_metric="bleu",
        metrics={EVAL_SPLIT: METRIC_KEYS},
        source=source,
        references={EVAL_SPLIT: [refs[i] for i in keep]} if part != "train" else {},
    )
