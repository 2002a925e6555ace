"""Running one experiment: config -> method spec -> the engine for its shape -> run folder.

`run_experiment` resolves the config against its method (`cotune.methods.resolve`),
then executes the method's spec: a `LocalSpec` in this process, a `SplitSpec` through
`runtime.split.launch`, a `FederatedSpec` on Flower (`runtime.federated.engine`). It
writes the resolved config first and `summary.json`, the method's saved tensors, its
per-example predictions of the final evaluation (`predictions.jsonl`; a federated
ServerApp writes its own), the plot and the report last.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from cotune.config import Config, load_config, to_toml
from cotune.data.registry import Part, check_task_data, with_data_path
from cotune.errors import ConfigError, ExportError, UserError
from cotune.export import Export, export_model
from cotune.memory import mark_rest, tune_allocator
from cotune.methods import (
    FederatedSpec,
    LocalSpec,
    MethodResult,
    SplitSpec,
    get_spec,
    method_names,
    resolve,
)
from cotune.report import RunFolder, default_run_dir, finish_run, progress
from cotune.report.trackers import check_trackers, open_trackers
from cotune.runtime.launcher import process_env
from cotune.runtime.memory_cap import apply_memory_cap
from cotune.runtime.provenance import git_commit, provenance
from cotune.training.resume import checkpoint_step

log = logging.getLogger(__name__)


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """A config file (and `--set` overrides) checked against its method's rules."""
    return resolve(load_config(path, overrides))


def use_own_data(cfg: Config, path: str | Path) -> Config:
    """`cotune device --data PATH`: this device's data is PATH, as `task.train_file`
    (a csv / json / squad file) or `task.data_dir` (a folder) would name it; a splitfed
    device trains on all of it (`federated.client_data = "node"`), not on a partition.
    A missing path is a `DataError`."""
    cfg.task = with_data_path(cfg.task, path)
    if "federated" in get_spec(cfg.method).reads:  # one of many devices: all its data
        cfg.federated.client_data = "node"
    return resolve(cfg)


def data_part(cfg: Config) -> Part:
    """Which part of the task this process reads: a federated server whose clients
    bring their own data the evaluation data only, a device with its own data of a
    remote splitfed cloud the training data only, everything else all of it."""
    if cfg.federated.client_data != "node":
        return "all"
    kind = get_spec(cfg.method).kind
    if kind == "federated":
        return "eval"
    if kind == "split" and cfg.runtime.cloud is not None:
        return "train"
    return "all"


def resumable_methods() -> list[str]:
    """Methods whose spec can continue a run from its checkpoint (the federated ones and
    centralized)."""
    out = []
    for name in method_names():
        runs = get_spec(name).runs
        if isinstance(runs, FederatedSpec | LocalSpec) and runs.resumable:
            out.append(name)
    return out


def run_method(cfg: Config, run: RunFolder, resume: bool = False) -> MethodResult:
    """Execute `cfg`'s method spec, reporting into `run`."""
    runs = get_spec(cfg.method).runs
    if isinstance(runs, LocalSpec):
        if not resume:
            return runs.train(cfg, run, run.path)
        done = checkpoint_step(run.path)
        if done is None:
            log.warning("no checkpoint in %s: starting from step 0", run.path)
        run.truncate_after("step", done if done is not None else -1)  # records past it
        return runs.train(cfg, run, run.path, resume=True)
    if isinstance(runs, SplitSpec):
        from cotune.runtime.split.launch import run_split

        return run_split(cfg, runs, run, run.path)
    from cotune.runtime.federated.engine import run_federated

    return run_federated(cfg, run.path, resume=resume)


def network_offset_s(result: MethodResult) -> float:
    """The seconds an emulated network adds to the measured time (`[link.network]`):
    the method's `network.offset_s` (0 without one)."""
    network = result.extra.get("network")
    return float(network.get("offset_s", 0.0)) if isinstance(network, dict) else 0.0


def run_experiment(cfg: Config, out: str | Path | None = None, resume: bool = False) -> Path:
    """Run `cfg` and write its run folder; returns the folder's path.

    With `resume`, `out` is an existing run folder and the method continues from its
    last checkpoint (methods whose spec is resumable: centralized and the federated ones).
    """
    process_env()
    # the commit of the code this process loaded, read now: a commit made while a long
    # run trains must not be recorded as the run's (git_commit is cached per process)
    git_commit()
    resolve(cfg)
    allocator = tune_allocator(cfg.memory.allocator)
    mark_rest()  # the process at rest, for memory breakdowns (memory.report)
    spec = get_spec(cfg.method)
    apply_memory_cap(cfg, device_process=spec.kind == "local"
                     or (spec.kind == "split" and cfg.runtime.cloud is not None))  # fmt: skip
    if resume and cfg.method not in resumable_methods():
        raise ConfigError(
            f"method {cfg.method!r} cannot resume a run; resumable methods: "
            f"{', '.join(resumable_methods())}. Start it again without --resume."
        )
    # the user's own files: bad rows stop it here (a server whose clients bring their
    # own data checks its evaluation files only: it never opens a training file)
    check_task_data(cfg.task, cfg.seed, data_part(cfg))
    check_trackers(cfg.runtime.loggers)
    run = RunFolder(
        out if out is not None else default_run_dir(cfg.name),
        echo=progress.echo(cfg.train.steps),  # federated rounds: the server's own folder
    )
    if not resume:
        run.start_fresh()
    run.write_config(to_toml(cfg))
    if spec.kind != "federated":  # a federated run's records are the server's
        run.trackers = open_trackers(
            cfg.runtime.loggers, run.path, cfg.model_dump(mode="json"), to_toml(cfg)
        )
    t0 = time.perf_counter()
    try:
        result = run_method(cfg, run, resume)
    finally:
        run.close_trackers()
    wall = time.perf_counter() - t0
    for name, tensors in result.saved.items():
        if tensors:
            save_file(
                {k: v.detach().contiguous() for k, v in tensors.items()}, str(run.path / name)
            )
    if result.predictions:
        run.write_predictions(result.predictions)
    summary: dict[str, Any] = {
        "method": cfg.method,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "metrics": result.metrics,
        "comm": {"bytes_up": result.bytes_up, "bytes_down": result.bytes_down},
        "wall_s": wall,
        # compute + emulated network ([link.network]); wall_s when none is emulated
        "projected_wall_s": wall + network_offset_s(result),
        "device_peak_bytes": result.device_peak_bytes,
        "trainable_params": {"device": result.trainable_device, "cloud": result.trainable_cloud},
        "saved_activation_bytes": result.saved_activation_bytes,
        "seed": cfg.seed,
        "name": cfg.name,
        "method_kind": spec.kind,
        "allocator": allocator,  # what this process ran on (memory.allocator, as applied)
        **provenance(),  # versions (python, torch, transformers, peft, flwr, cotune), git_commit
        **result.extra,
    }
    run.write_summary(summary)
    finish_run(run)
    if cfg.runtime.export and spec.kind == "split" and cfg.runtime.cloud is not None:
        log.warning(
            "no model/: this run is a device of the cloud at %s and holds only its half of "
            "the model; copy the cloud's cloud_trainable.safetensors (cotune cloud --out) "
            "into %s and run `cotune export` on it",
            cfg.runtime.cloud, run.path,
        )  # fmt: skip
    elif cfg.runtime.export:
        try:
            export_model(run.path, cfg)
        except UserError as err:  # the run is complete: say why it has no model/
            log.warning("no model/: %s", err)
    return run.path


def export_run(
    run_dir: str | Path, *, out: str | Path | None = None, merge: bool = False
) -> Export:
    """Export the model of the finished run in `run_dir` from its saved weights and its
    config.toml (`cotune export`); ExportError when it is not a run folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist")
    saved = run / "config.toml"
    if not saved.is_file():
        raise ExportError(f"{run_dir} has no config.toml: it is not a cotune run folder")
    process_env()
    cfg = load_experiment(saved)
    return export_model(run, cfg, out=out, merge=merge)
