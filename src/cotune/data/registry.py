"""Task names -> loaders: `load_task` for runs, `list_tasks` for `cotune tasks`."""

from __future__ import annotations

import difflib

from cotune.config.schema import TaskConfig
from cotune.data import bbc, e2e
from cotune.data.glue import GLUE_SPECS, GlueSpec, load_folder, load_hub
from cotune.data.sampling import subsample
from cotune.data.task import Task
from cotune.errors import ConfigError

GLUE_SOURCE = "task.data_dir (folder in GLUE TSV layout) or HF hub nyu-mll/glue when online"


def task_names() -> list[str]:
    """Canonical names of every task `load_task` knows."""
    return [bbc.NAME, *(spec.name for spec in GLUE_SPECS.values()), e2e.NAME]


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


def canonical_name(name: str) -> str:
    """The canonical task name for `name` (case-insensitive, aliases such as "sst-2")."""
    found = _ALIASES.get(_squash(name))
    if found is not None:
        return found
    valid = task_names()
    close = difflib.get_close_matches(name.strip().lower(), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"task.name {name!r} is not a known task. Valid names: {', '.join(valid)} "
        f"(case-insensitive; aliases such as 'sst2' or 'glue/sst-2' also work).{hint}"
    )


def _glue_spec(canonical: str) -> GlueSpec:
    return GLUE_SPECS[canonical.removeprefix("glue/")]


def load_task(cfg: TaskConfig, seed: int, *, require_train: bool = True) -> Task:
    """Load the task `cfg.name` with its seeded subsamples and splits.

    Unknown name -> ConfigError listing valid names; missing or malformed data ->
    DataError. With `require_train=False` a GLUE folder without train.tsv (such as
    ../shared/data/glue/QNLI) loads for evaluation only, with an empty `train`.
    """
    name = canonical_name(cfg.name)
    if name == bbc.NAME:
        return bbc.load_bbc(
            cfg.data_dir, seed, cfg.test_fraction, cfg.max_train_examples, cfg.max_eval_examples
        )
    if name == e2e.NAME:
        return e2e.load_e2e(
            cfg.data_dir, seed, cfg.max_train_examples, cfg.max_eval_examples,
            require_train=require_train,
        )  # fmt: skip
    spec = _glue_spec(name)
    if cfg.data_dir is not None:
        train, evals = load_folder(spec, cfg.data_dir, require_train)
        source = cfg.data_dir
    else:
        train, evals = load_hub(spec, require_train)
        source = "hf:nyu-mll/glue"
    return Task(
        name=name,
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
    return rows


def task_kind(name: str) -> str:
    """The kind of task `name` ("classification", "regression", "generation") without
    loading it; a `ConfigError` for an unknown name (like `load_task`)."""
    canonical = canonical_name(name)
    return next(row["kind"] for row in list_tasks() if canonical_name(row["name"]) == canonical)
