"""Loading configs: TOML file + `--set a.b=c` overrides -> validated `Config`."""

from __future__ import annotations

import os
import tomllib
import warnings
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from cotune.config.schema import Config, DeviceProfile
from cotune.errors import ConfigError


def parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, lists, inline tables), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` to the raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-3), got {assignment!r}.")
    key, _, raw = assignment.partition("=")
    parts = [p.strip() for p in key.strip().split(".") if p.strip()]
    if not parts:
        raise ConfigError(f"--set {assignment!r} names no key.")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section.")
        node = child
    node[parts[-1]] = parse_value(raw.strip())


def _fields_of(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The valid keys of the section at `loc` (for 'unknown key' messages)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        current = nested[0] if nested else ann
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int) or True)
        # pydantic puts the union member name (e.g. 'LoraConfig') into loc: drop it
        loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_of(Config, loc[:-1])
            where = ".".join(str(p) for p in loc[:-1])
            section = f"[{where}]" if where else "the top level"
            hint = f"; valid keys in {section}: {', '.join(valid)}" if valid else ""
            lines.append(f"unknown key '{key}'{hint}")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{key}: {e['msg']}{got_s}")
    return "invalid config: " + "; ".join(lines) + "."


# Keys that hold a file or folder path. A relative path in a config file is relative to
# the file's folder (so a config runs from any directory, and a run folder's saved config
# runs again as it is); a relative `--set` value is relative to the current directory.
# Both are stored absolute in the resolved config.
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("task", "data_dir"),
    ("task", "train_file"),
    ("task", "eval_file"),
    ("federated", "fleet"),
    ("runtime", "tokens"),
    ("runtime", "tls_cert"),
    ("runtime", "tls_key"),
    ("runtime", "tls_ca"),
)


def _relative_paths(data: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """(section, key, value) of every relative path value in `data`."""
    found = []
    for section, key in PATH_KEYS:
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        value = node.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            found.append((node, key, value))
    return found


def anchor_paths(data: dict[str, Any], folder: Path, source: str) -> None:
    """Make the relative paths of a config read from `source` (in `folder`) absolute,
    relative to `folder`. A path that only exists relative to the current directory (the
    rule before configs were self-anchored) is taken from there, with a warning."""
    for node, key, value in _relative_paths(data):
        anchored = os.path.abspath(folder / Path(value).expanduser())
        if not os.path.exists(anchored) and os.path.exists(value):
            name = next(s for s, k in PATH_KEYS if data.get(s) is node and k == key)
            warnings.warn(
                f"{source}: {name}.{key} = {value!r} does not exist relative to the config "
                f"file's folder ({folder}) but does from the current directory, so it is "
                "taken from there; paths in a config file are relative to the file's folder: "
                f"write {os.path.relpath(os.path.abspath(value), folder)!r}",
                stacklevel=3,
            )
            anchored = os.path.abspath(value)
        node[key] = anchored


def read_fleet(path: str | Path) -> list[dict[str, Any]]:
    """The `[[device]]` tables of a fleet file, each checked as a `DeviceProfile`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"federated.fleet: fleet file {str(p)!r} does not exist.")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"fleet file {str(p)!r} is not valid TOML: {err}.") from None
    devices = data.get("device")
    extra = sorted(set(data) - {"device"})
    if extra or not isinstance(devices, list) or not devices:
        raise ConfigError(
            f"fleet file {str(p)!r} must hold one or more [[device]] tables (keys: "
            f"{', '.join(DeviceProfile.model_fields)}) and nothing else"
            + (f"; unexpected: {', '.join(extra)}" if extra else "")
            + "."
        )
    for i, device in enumerate(devices):
        try:
            DeviceProfile.model_validate(device)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or 'device'}: {e['msg']}"
                for e in err.errors()
            )
            raise ConfigError(
                f"fleet file {str(p)!r}, device {i}: {problems} (valid keys: "
                f"{', '.join(DeviceProfile.model_fields)})."
            ) from None
    return [dict(d) for d in devices]


def _inline_fleet(data: dict[str, Any]) -> None:
    """Replace `federated.fleet` (a file) by the devices it lists; an empty
    `federated.fleet` (`--set federated.fleet=""`) drops the file a config names."""
    fed = data.get("federated")
    if not isinstance(fed, dict) or "fleet" not in fed:
        return
    if fed["fleet"] in (None, ""):
        del fed["fleet"]
        return
    if fed.get("devices"):
        raise ConfigError(
            "give the devices in federated.fleet (a file) or federated.devices, not both."
        )
    fed["devices"] = read_fleet(str(fed.pop("fleet")))


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for assignment in overrides or []:
        apply_override(data, assignment)
    for node, key, value in _relative_paths(data):  # from --set: the current directory
        node[key] = os.path.abspath(Path(value).expanduser())
    _inline_fleet(data)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    cfg._given = frozenset(k for k, v in data.items() if isinstance(v, dict))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or start from defaults if `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist.")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}.") from None
        anchor_paths(data, p.resolve().parent, str(p))
    return build_config(data, overrides)


def to_toml(cfg: Config) -> str:
    """The fully resolved config as TOML: every key of the sections the method reads
    (every section before the method has resolved the config; None values are omitted:
    they mean 'default'). Loading it again gives `cfg`."""
    from cotune.config.schema import OPTIONAL_SECTIONS

    data = cfg.model_dump(mode="json", exclude_none=True)
    if cfg._reads is not None:
        data = {
            k: v
            for k, v in data.items()
            if not isinstance(v, dict) or k not in OPTIONAL_SECTIONS or k in cfg._reads
        }
    data.setdefault("train", {})["lr"] = cfg.resolved_lr()
    return tomli_w.dumps(data)


def write_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_toml(cfg))
