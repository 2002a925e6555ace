"""What the ServerApp reads from Flower's run config to find its experiment.

cotune's Flower App (`cotune.flower_app`) is run two ways:

- by `cotune run`, which writes the run folder's config.toml first and passes the
  folder as `run-dir`;
- by `flwr run APP_DIR FEDERATION`, where the run config names the experiment: a
  cotune config file (`config`, an absolute path or one relative to the ServerApp's
  working directory), or else the `cotune.*` keys, a cotune config flattened the way
  Flower flattens `[tool.flwr.app.config.cotune]` tables (`cotune.federated.rounds`).
  The ServerApp writes it to `run-dir`/config.toml (default: `runs/flwr-<run id>`
  under its working directory) and goes on as for `cotune run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotune.config import Config, build_config, load_config, to_toml
from cotune.errors import ConfigError
from cotune.methods import resolve

RUN_DIR_KEY = "run-dir"
CONFIG_FILE_KEY = "config"  # a cotune config file
TABLE_PREFIX = "cotune."  # the flattened `[tool.flwr.app.config.cotune]` table
CONFIG_NAME = "config.toml"


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1, "c": 2} -> {"a": {"b": 1}, "c": 2}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"run config key {key!r} nests under a value")
        node[leaf] = value
    return out


def experiment_config(run_config: dict[str, Any]) -> Config | None:
    """The experiment the run config names: the `config` file if set, else the
    `cotune.*` table, else None (the run folder already holds config.toml)."""
    path = str(run_config.get(CONFIG_FILE_KEY, "")).strip()
    if path:
        return resolve(load_config(Path(path).expanduser()))
    table = {k[len(TABLE_PREFIX) :]: v for k, v in run_config.items() if k.startswith(TABLE_PREFIX)}
    if table:
        return resolve(build_config(unflatten(table)))
    return None


def prepare_run_dir(run_config: dict[str, Any], run_id: int) -> dict[str, Any]:
    """The run config with `run-dir` an absolute folder holding the experiment's
    config.toml (written from `config` / `cotune.*` when they name one)."""
    given = str(run_config.get(RUN_DIR_KEY, "")).strip()
    run_dir = (Path(given) if given else Path("runs") / f"flwr-{run_id}").expanduser().resolve()
    cfg = experiment_config(run_config)
    if cfg is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_NAME).write_text(to_toml(cfg))
    elif not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(
            f"the cotune ServerApp found no experiment: {run_dir / CONFIG_NAME} does not "
            f"exist and the run config sets neither {CONFIG_FILE_KEY!r} (a cotune config "
            f"file) nor {TABLE_PREFIX}* keys; e.g. flwr run APP_DIR FEDERATION "
            f'--run-config \'config="/abs/path/experiment.toml" '
            f'{RUN_DIR_KEY}="/abs/path/run"\''
        )
    return {**run_config, RUN_DIR_KEY: str(run_dir)}
