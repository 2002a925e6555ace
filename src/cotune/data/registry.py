"""Task names -> loaders: `load_task` for runs, `list_tasks` for `cotune tasks`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from cotune.config.schema import TaskConfig
from cotune.data import bbc, digits, e2e, fashion_mnist, image_folder, squad, table, text_folder
from cotune.data.glue import GLUE_SPECS, GlueSpec, load_folder, load_hub
from cotune.data.sampling import stratified_split, subsample
from cotune.data.task import Example, Task
from cotune.errors import ConfigError, DataError

GLUE_SOURCE = (
    "task.data_dir (folder in GLUE TSV layout) or HF hub nyu-mll/glue with HF_DATASETS_OFFLINE=0"
)


def task_names() -> list[str]:
    """Canonical names of every task `load_task` knows (besides `hf:<id>`)."""
    return [
        bbc.NAME, *(spec.name for spec in GLUE_SPECS.values()), e2e.NAME, squad.NAME,
        text_folder.NAME, *table.FILE_TASKS, fashion_mnist.NAME, image_folder.NAME, digits.NAME,
    ]  # fmt: skip


def _squash(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch.isalnum() or ch == "/")


# Squashed alias -> canonical name (case, "-", "_" and spaces are ignored).
_ALIASES: dict[str, str] = {"bbcnews": bbc.NAME, "bbc": bbc.NAME}
for _key in GLUE_SPECS:
    _ALIASES[_key] = f"glue/{_key}"
    _ALIASES[f"glue/{_key}"] = f"glue/{_key}"
    _ALIASES[f"glue{_key}"] = f"glue/{_key}"
_ALIASES["glue/sts"] = _ALIASES["sts"] = "glue/stsb"
_ALIASES["e2e"] = _ALIASES["e2enlg"] = e2e.NAME
_ALIASES["squad"] = _ALIASES["squad11"] = _ALIASES["squadv11"] = squad.NAME
_ALIASES["fashionmnist"] = _ALIASES["fmnist"] = fashion_mnist.NAME
_ALIASES["imagefolder"] = _ALIASES["images"] = image_folder.NAME
_ALIASES["textfolder"] = text_folder.NAME
_ALIASES["csv"] = _ALIASES["tsv"] = "csv"
_ALIASES["json"] = _ALIASES["jsonl"] = _ALIASES["jsonlines"] = "json"
_ALIASES["digits"] = _ALIASES["sklearndigits"] = _ALIASES["optdigits"] = digits.NAME


def canonical_name(name: str) -> str:
    """The canonical task name for `name` (case-insensitive, aliases such as "sst-2");
    `hf:<id>` stays as given (the id is case-sensitive)."""
    if name.strip().lower().startswith(table.HF_PREFIX):
        return table.HF_PREFIX + name.strip()[len(table.HF_PREFIX) :].strip()
    found = _ALIASES.get(_squash(name))
    if found is not None:
        return found
    valid = task_names()
    close = difflib.get_close_matches(name.strip().lower(), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"task.name {name!r} is not a known task. Valid names: {', '.join(valid)} "
        f", or hf:<id> for a datasets data set (case-insensitive; aliases such as 'sst2' or "
        f"'glue/sst-2' also work).{hint}"
    )


def _glue_spec(canonical: str) -> GlueSpec:
    return GLUE_SPECS[canonical.removeprefix("glue/")]


Part = Literal["all", "train", "eval"]
# tasks that load one part alone (a node's own data, a server without training data)
PART_TASKS = "csv, json, hf:<id>, text-folder, e2e and the GLUE tasks"


def _has_parts(name: str) -> bool:
    return (
        name.startswith(table.HF_PREFIX)
        or name in (*table.FILE_TASKS, text_folder.NAME, e2e.NAME)
        or name.removeprefix("glue/") in GLUE_SPECS
    )


def labels_from_data(cfg: TaskConfig) -> bool:
    """Whether the task's classes come from its data (so `task.labels` may fix them):
    classification with csv, json, hf:<id> or text-folder."""
    name = canonical_name(cfg.name)
    if name == text_folder.NAME:
        return True
    tabular = name in table.FILE_TASKS or name.startswith(table.HF_PREFIX)
    return tabular and table.problem_of(cfg) == "classification"


def load_task(
    cfg: TaskConfig, seed: int, *, require_train: bool = True, part: Part = "all"
) -> Task:
    """Load the task `cfg.name` with its seeded subsamples and splits.

    Unknown name -> ConfigError listing valid names; missing or malformed data ->
    DataError. With `require_train=False` a GLUE folder without train.tsv (such as
    ../shared/data/glue/QNLI) loads for evaluation only, with an empty `train`.

    `part` "train" loads a node's own data: every training example is trained on (no
    evaluation split is read or held out). "eval" loads the evaluation data alone (a
    server whose clients bring their data): no training file is opened, and a task
    whose evaluation examples would be held out of the training data has none
    (`task.eval` is empty). Both exist for `PART_TASKS`.
    """
    name = canonical_name(cfg.name)
    if cfg.labels is not None and not labels_from_data(cfg):
        raise ConfigError(
            f"task.labels fixes the classes of classification tasks whose classes come from "
            f"the data (csv, json, hf:<id>, text-folder); {name} has its own"
        )
    if part != "all" and not _has_parts(name):
        raise ConfigError(
            f"task {name!r} cannot be loaded as a node's own data or as evaluation data "
            f"alone yet; tasks that can: {PART_TASKS}"
        )
    if name.startswith(table.HF_PREFIX):
        return table.load_hf_task(name, cfg, seed, part)
    if name in table.FILE_TASKS:
        return table.load_file_task(name, cfg, seed, part)
    if name == text_folder.NAME:
        return text_folder.load_text_folder(cfg, seed, part)
    if name == bbc.NAME:
        return bbc.load_bbc(
            cfg.data_dir, seed, cfg.test_fraction, cfg.max_train_examples, cfg.max_eval_examples
        )
    if name == e2e.NAME:
        return e2e.load_e2e(
            cfg.data_dir, seed, cfg.max_train_examples, cfg.max_eval_examples,
            require_train=require_train, part=part,
        )  # fmt: skip
    if name == squad.NAME:
        return squad.load_squad(
            cfg.data_dir, seed, cfg.max_train_examples, cfg.max_eval_examples,
            split_eval=cfg.split_eval, train_file=cfg.train_file,
        )  # fmt: skip
    if name == fashion_mnist.NAME:
        return fashion_mnist.load_fashion_mnist(
            cfg.data_dir, seed, cfg.max_train_examples, cfg.max_eval_examples
        )
    if name == digits.NAME:
        return digits.load_digits_task(
            seed, cfg.max_train_examples, cfg.max_eval_examples, cfg.split_eval
        )
    if name == image_folder.NAME:
        return image_folder.load_image_folder(
            cfg.data_dir, seed, cfg.max_train_examples, cfg.max_eval_examples,
            split_eval=cfg.split_eval,
        )  # fmt: skip
    spec = _glue_spec(name)
    if part != "all":
        return _glue_part(spec, cfg, seed, part)
    need_train = require_train and cfg.split_eval is None
    if cfg.data_dir is not None:
        train, evals = load_folder(spec, cfg.data_dir, need_train)
        source = cfg.data_dir
    else:
        train, evals = load_hub(spec, need_train)
        source = "hf:nyu-mll/glue"
    if cfg.split_eval is not None:
        train, evals = split_eval_file(spec.name, train, evals, cfg.split_eval)
        source += f" (train/eval split of its evaluation file, {cfg.split_eval:g} held out)"
    return _glue_task(spec, cfg, seed, train, evals, source)


def _glue_part(spec: GlueSpec, cfg: TaskConfig, seed: int, part: Part) -> Task:
    """A GLUE task's training part (a node's folder: train.tsv, or with
    `task.split_eval` the training share of its evaluation file) or evaluation part
    (the evaluation files of `task.data_dir`; none without it)."""
    held = cfg.split_eval is not None
    if cfg.data_dir is None:
        if part == "train":
            raise ConfigError(
                f"{spec.name}: a node's data is a folder in GLUE TSV layout holding train.tsv"
            )
        train: list[Example] = []
        evals: dict[str, list[Example]] = {}
        source = "(no evaluation data: task.data_dir is not set)"
    else:
        train, evals = load_folder(
            spec, cfg.data_dir, part == "train" and not held,
            read_train=part == "train" and not held, read_eval=part == "eval" or held,
        )  # fmt: skip
        if held:
            train, evals = split_eval_file(spec.name, train, evals, cfg.split_eval or 0.0)
        if part == "train":
            evals = {}
        else:
            train = []
        source = cfg.data_dir
    return _glue_task(spec, cfg, seed, train, evals, source)


def _glue_task(
    spec: GlueSpec,
    cfg: TaskConfig,
    seed: int,
    train: list[Example],
    evals: dict[str, list[Example]],
    source: str,
) -> Task:
    """The `Task` of a GLUE-style spec from its loaded parts, subsampled as `cfg` says."""
    return Task(
        name=spec.name,
        kind=spec.kind,
        num_labels=1 if spec.label_values is None else len(spec.label_names),
        label_names=list(spec.label_names),
        train=subsample(train, cfg.max_train_examples, seed, "train"),
        eval={
            split: subsample(examples, cfg.max_eval_examples, seed, f"eval/{split}")
            for split, examples in evals.items()
        },
        primary_metric=spec.primary_metric,
        metrics=dict(spec.metrics),
        source=source,
    )


def check_task_data(cfg: TaskConfig, seed: int, part: Part = "all") -> None:
    """Read a user's own data files (`csv`, `json`, `text-folder`) once before a run
    starts, so that malformed input stops it before anything is written; a `DataError`
    names the file and line. Other tasks are checked when their method loads them.
    `part` "eval": a server whose clients bring their own data checks its evaluation
    files only."""
    if canonical_name(cfg.name) in (*table.FILE_TASKS, text_folder.NAME):
        load_task(cfg, seed, part=part)


def with_data_path(cfg: TaskConfig, path: str | Path) -> TaskConfig:
    """`cfg` reading its data from `path` (a node's or a device's own data): a file is
    the training file of a `csv` / `json` / `squad` task (`task.train_file`), a folder
    the task's data folder (`task.data_dir`). A missing path is a `DataError`."""
    where = Path(path).expanduser().absolute()
    name = canonical_name(cfg.name)
    if not where.exists():
        raise DataError(f"the data path {str(where)!r} does not exist")
    if where.is_file():
        if name not in (*table.FILE_TASKS, squad.NAME):
            raise DataError(
                f"the data path {str(where)!r} is a file; task {name!r} reads a folder "
                f"(what task.data_dir would name)"
            )
        return cfg.model_copy(update={"train_file": str(where)})
    return cfg.model_copy(update={"data_dir": str(where), "train_file": None})


def fingerprint(examples: list[Example], task: Task) -> str:
    """A SHA-256 of the multiset of `examples`, independent of their order: the sorted
    lines `json.dumps([text_a, text_b, label])`, joined by newlines, where `label` is
    the class name (classification), the value (regression) or null (generation)."""
    import hashlib
    import json

    def label(ex: Example) -> str | float | None:
        if task.kind == "regression":
            return float(ex.label)
        if task.label_names and isinstance(ex.label, int):
            return task.label_names[ex.label]
        return None

    lines = sorted(json.dumps([ex.text_a, ex.text_b, label(ex)]) for ex in examples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


SPLIT_EVAL_SEED = 0  # the same held-out examples for every run seed (paired comparisons)


def split_eval_file(
    name: str, train: list[Example], evals: dict[str, list[Example]], fraction: float
) -> tuple[list[Example], dict[str, list[Example]]]:
    """`task.split_eval`: a stratified, seeded split of the one evaluation file into
    training examples and the held-out `fraction` that stays the evaluation split. The
    split does not depend on the run's seed, so every seed is scored on the same
    examples."""
    if train:
        raise ConfigError(
            f"task.split_eval is for {name} folders without train.tsv; this one has "
            f"{len(train)} training rows: remove task.split_eval to use them"
        )
    if len(evals) != 1:
        raise ConfigError(
            f"task.split_eval needs a task with one evaluation file; {name} has {', '.join(evals)}"
        )
    ((split, pool),) = evals.items()
    labels = [int(ex.label) if isinstance(ex.label, int) else 0 for ex in pool]
    train_idx, eval_idx = stratified_split(labels, fraction, SPLIT_EVAL_SEED)
    return [pool[i] for i in sorted(train_idx)], {split: [pool[i] for i in sorted(eval_idx)]}


def list_tasks() -> list[dict]:
    """One row per task for `cotune tasks`: name, kind, metric keys and data source."""
    rows = [
        {
            "name": bbc.NAME,
            "kind": "classification",
            "metrics": ["accuracy", "f1"],
            "source": bbc.SOURCE,
        }
    ]
    for spec in GLUE_SPECS.values():
        metrics: list[str] = []
        for _, keys in spec.metrics:
            metrics.extend(k for k in keys if k not in metrics)
        rows.append(
            {"name": spec.name, "kind": spec.kind, "metrics": metrics, "source": GLUE_SOURCE}
        )
    rows.append(
        {
            "name": e2e.NAME,
            "kind": "generation",
            "metrics": list(e2e.METRIC_KEYS),
            "source": e2e.SOURCE,
        }
    )
    rows.append(
        {
            "name": squad.NAME,
            "kind": "qa",
            "metrics": list(squad.METRIC_KEYS),
            "source": squad.SOURCE,
        }
    )
    rows.append(
        {
            "name": text_folder.NAME,
            "kind": "classification",
            "metrics": ["accuracy", "f1"],
            "source": text_folder.SOURCE,
        }
    )
    for kind in table.FILE_TASKS:
        rows.append(
            {
                "name": kind,
                "kind": "classification | regression | generation (task.problem)",
                "metrics": ["accuracy", "f1", "pearson", "spearman", "bleu", "..."],
                "source": table.SOURCE[kind],
            }
        )
    for module in (fashion_mnist, image_folder, digits):
        rows.append(
            {
                "name": module.NAME,
                "kind": module.KIND,
                "metrics": ["accuracy"],
                "source": module.SOURCE,
            }  # fmt: skip
        )
    return rows


def task_kind(name: str, cfg: TaskConfig | None = None) -> str:
    """The kind of task `name` ("classification", "regression", "generation", "qa",
    "image-classification") without loading it; a `ConfigError` for an unknown name
    (like `load_task`). The kind of a `csv` / `json` / `hf:<id>` task is its config's
    `task.problem` (classification when `cfg` is not given)."""
    canonical = canonical_name(name)
    if canonical in table.FILE_TASKS or canonical.startswith(table.HF_PREFIX):
        return table.problem_of(cfg) if cfg is not None else "classification"
    return next(row["kind"] for row in list_tasks() if canonical_name(row["name"]) == canonical)


IMAGE_KINDS = ("image-classification",)


def task_modality(name: str) -> str:
    """ "image" or "text": what the examples of task `name` hold (without loading it)."""
    return "image" if task_kind(name) in IMAGE_KINDS else "text"
