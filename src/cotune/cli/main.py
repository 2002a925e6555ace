"""`cotune run / compare / models / tasks / methods` (and split methods' `cloud` / `device`)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

from cotune.errors import UserError

EXIT_USAGE = 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    if issubclass(category, UserWarning) and "cotune" in str(filename):
        print(f"cotune: warning: {message}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from cotune.runtime.experiment import load_experiment, run_experiment

    if args.resume:
        from pathlib import Path

        from cotune.errors import ConfigError

        if args.config or args.out:
            raise ConfigError(
                "--resume RUN_DIR continues that run in place: give no CONFIG and no --out "
                "(--set still overrides keys, e.g. federated.rounds to run longer)"
            )
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.toml there; is it a run folder?")
        cfg = load_experiment(saved, args.set)
        path = run_experiment(cfg, args.resume, resume=True)
    else:
        cfg = load_experiment(args.config, args.set)
        path = run_experiment(cfg, args.out)
    from cotune.report import read_summary

    summary = read_summary(path)
    metrics = ", ".join(
        f"{k}={v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float)
    )
    print(f"{cfg.method} on {cfg.task.name}: {metrics}")
    print(f"run folder: {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cotune.report.compare import compare

    compare(args.runs, args.plot)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cotune.models import list_models

    table = Table(title="cotune models")
    for col in ("name", "family", "params", "available", "origin"):
        table.add_column(col)
    for m in list_models():
        params = m.get("params")
        table.add_row(
            m["name"],
            m["family"],
            f"{params / 1e6:.1f}M" if isinstance(params, int | float) else "-",
            "yes" if m.get("available") else "no",
            m.get("origin", ""),
        )
    Console().print(table)
    print(
        "Also accepted: a local folder holding a transformers checkpoint, or a hub id when online."
    )
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cotune.data import list_tasks

    table = Table(title="cotune tasks")
    for col in ("name", "kind", "metrics", "source"):
        table.add_column(col)
    for t in list_tasks():
        metrics = t.get("metrics", "")
        table.add_row(
            t["name"],
            t.get("kind", ""),
            ", ".join(metrics) if isinstance(metrics, list | tuple) else str(metrics),
            t.get("source", ""),
        )
    Console().print(table)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cotune.methods import get_spec, method_names

    table = Table(title="cotune methods")
    for col in ("name", "runs", "what it does", "optional sections read"):
        table.add_column(col)
    for name in method_names():
        spec = get_spec(name)
        table.add_row(name, spec.kind, spec.summary, ", ".join(sorted(spec.reads)))
    Console().print(table)
    return 0


def cmd_cloud(args: argparse.Namespace) -> int:
    from cotune.runtime.experiment import load_experiment
    from cotune.runtime.launcher import offline_env
    from cotune.runtime.split.serve import serve_forever

    offline_env()
    cfg = load_experiment(args.config, args.set)
    return serve_forever(cfg, args.listen, out=args.out, port_file=args.port_file)


def cmd_device(args: argparse.Namespace) -> int:
    from cotune.link.errors import LinkError
    from cotune.report import read_summary
    from cotune.runtime.experiment import load_experiment, run_experiment

    sets = [*args.set, f'runtime.cloud="{args.cloud}"', f"runtime.device_id={args.device_id}"]
    sets.append('runtime.transport="grpc"')
    cfg = load_experiment(args.config, sets)
    try:
        path = run_experiment(cfg, args.out)
    except LinkError as err:
        print(f"cotune: link error ({err.code}): {err.message}", file=sys.stderr)
        return 1
    summary = read_summary(path)
    metrics = ", ".join(
        f"{k}={v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float)
    )
    comm = summary["comm"]
    up, down = comm["bytes_up"], comm["bytes_down"]
    print(f"device {args.device_id}: {metrics}; bytes up {up:,}, down {down:,}")
    print(f"run folder: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cotune",
        description="Fine-tune foundation models across weak devices and a cloud.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run an experiment from a TOML config")
    p.add_argument("config", nargs="?", help="TOML config file (defaults apply if omitted)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-3 (repeatable)",
    )
    p.add_argument("--out", help="run folder (default runs/<timestamp>-<name>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (federated methods), with its config",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="compare finished runs")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--plot", help="where to write the comparison plot (PNG)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("models", help="list the models available and where they come from")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("tasks", help="list the tasks and their metrics")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("methods", help="list the methods and what they do")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("cloud", help="serve the cloud side of split training over gRPC")
    p.add_argument("--config", help="TOML config (the same file the devices use)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="address to serve on, e.g. 0.0.0.0:50051",
    )
    p.add_argument(
        "--out", help="folder for the cloud's trained tensors and byte counts (written on exit)"
    )
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_cloud)

    p = sub.add_parser("device", help="train as a device of a split cloud over gRPC")
    p.add_argument("--config", help="TOML config (the same file the cloud uses)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument("--cloud", required=True, metavar="HOST:PORT", help="address of `cotune cloud`")
    p.add_argument("--device-id", type=int, default=0, help="this device's id in the token file")
    p.add_argument("--out", help="run folder (default runs/<timestamp>-<name>)")
    p.set_defaults(func=cmd_device)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # before anything imports transformers / huggingface_hub (they read these at import)
    from cotune.runtime.launcher import offline_env

    offline_env()
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="cotune: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"cotune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
