"""`cotune run / compare / models / tasks` (and the split services' `cloud` / `device`)."""

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
    from cotune.config import load_config
    from cotune.runtime.local import run_experiment

    cfg = load_config(args.config, args.set)
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
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="compare finished runs")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--plot", help="where to write the comparison plot (PNG)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("models", help="list the models available and where they come from")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("tasks", help="list the tasks and their metrics")
    p.set_defaults(func=cmd_tasks)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
