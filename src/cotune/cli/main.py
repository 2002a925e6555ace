"""`cotune run / sweep / compare / demo / config / export / models / tasks / methods` (and split methods'
`cloud` / `device`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from cotune.cli.keys import INSECURE_HELP, add_keys_parser
from cotune.errors import UserError

# cotune.training.loop.PROGRESS_ENV (not imported here: `cotune --help` stays torch-free)
QUIET_ENV = "COTUNE_PROGRESS"

EXIT_USAGE = 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    if issubclass(category, UserWarning) and "cotune" in str(filename):
        print(f"cotune: warning: {message}", file=sys.stderr)


def _print_aggregate(folder: str) -> None:
    import json
    from pathlib import Path

    from cotune.report.aggregate import AGGREGATE_FILE, format_metric

    agg = json.loads((Path(folder) / AGGREGATE_FILE).read_text())
    size = f", {agg['eval_size']} eval examples" if agg.get("eval_size") else ""
    print(f"{agg['method']} on {agg['task']}, {agg['n_seeds']} seeds {agg['seeds']}{size}:")
    for name, m in agg["metrics"].items():
        if m["mean"] is not None:
            print(f"  {format_metric(name, m, agg['confidence'])}")
    print(f"aggregate: {Path(folder) / AGGREGATE_FILE}")


_UNITS = {"": 1 / 2**20, "b": 1 / 2**20, "k": 1 / 1024, "kb": 1e3 / 2**20, "kib": 1 / 1024,
          "m": 1.0, "mb": 1e6 / 2**20, "mib": 1.0, "g": 1024.0, "gb": 1e9 / 2**20,
          "gib": 1024.0}  # fmt: skip


def parse_memory_size(text: str, flag: str = "--max-memory") -> float:
    """`1.5GiB`, `800MiB`, `2GB`, `900M` -> MiB (a bare number is bytes)."""
    import re

    from cotune.errors import UserError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(
            f"{flag} {text!r}: give a positive size such as 1.5GiB, 800MiB, 2GB or 900M "
            "(units B, K/KiB, KB, M/MiB, MB, G/GiB, GB)"
        )
    return float(m.group(1)) * _UNITS[unit]


def _cap_sets(args: argparse.Namespace) -> list[str]:
    cap = getattr(args, "max_memory", None)
    sets = [f"memory.max_device_mib={parse_memory_size(cap)}"] if cap else []
    return sets + (["runtime.insecure=true"] if getattr(args, "insecure", False) else [])


def cmd_run(args: argparse.Namespace) -> int:
    from cotune.runtime.experiment import load_experiment, run_experiment
    from cotune.runtime.process_allocator import ensure_process_allocator

    args.set = [*args.set, *_cap_sets(args)]

    if args.seeds is not None:
        from cotune.errors import ConfigError
        from cotune.runtime.seeds import parse_seeds, run_seeds

        if args.resume:
            raise ConfigError(
                "--seeds resumes by itself (finished seeds are skipped): give CONFIG and the "
                "same --out again instead of --resume"
            )
        folder = run_seeds(args.config, args.set, parse_seeds(args.seeds), args.out)
        _print_aggregate(str(folder))
        print(f"seed group folder: {folder} (again with --out {folder} to resume or add seeds)")
        return 0
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
        ensure_process_allocator(cfg)
        path = run_experiment(cfg, args.resume, resume=True)
    else:
        cfg = load_experiment(args.config, args.set)
        ensure_process_allocator(cfg)
        path = run_experiment(cfg, args.out)
    from cotune.report import read_summary

    summary = read_summary(path)
    metrics = ", ".join(
        f"{k}={v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float)
    )
    print(f"{cfg.method} on {cfg.task.name}: {metrics}")
    print(f"run folder: {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cotune.runtime.seeds import parse_seeds
    from cotune.runtime.sweep import parse_grid, run_sweep

    axes = parse_grid(args.grid)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    result = run_sweep(args.config, args.set, axes, seeds=seeds, parallel=args.parallel,
                       out=args.out)  # fmt: skip
    from cotune.report.compare import compare

    if any(c.get("aggregate") for c in result.combinations):
        compare([result.out], result.out / "compare.png")
    print(f"sweep folder: {result.out} (again with --out {result.out} to resume)")
    if result.failed:
        print(f"cotune: {len(result.failed)} run(s) failed: {', '.join(result.failed)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cotune.report.compare import compare

    compare(args.runs, args.plot, resamples=args.resamples)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cotune.report.demo import demo_rows, demo_table
    from cotune.runtime.demo import run_demo

    def row_done(name: str, path: object, seconds: float) -> None:
        print(f"demo row {name}: {seconds:.0f} s -> {path}", file=sys.stderr)

    result = run_demo(args.configs, args.out, sets=args.set, on_row=row_done)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(demo_table(demo_rows(result.rows)))
    print(f"demo: {len(result.rows)} rows in {result.total_s:.0f} s; page: {result.page}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from cotune.errors import ConfigError

    if args.defaults:
        if args.config or args.set:
            raise ConfigError(
                "--defaults prints the schema's defaults: give no CONFIG and no --set "
                "(`cotune config CONFIG` prints a config file resolved)"
            )
        from cotune.config.describe import defaults_toml

        sys.stdout.write(defaults_toml())
        return 0
    if not args.config:
        raise ConfigError(
            "give --defaults (every key with its default and help) or a CONFIG file to "
            "print resolved (with its method's defaults and --set overrides applied)"
        )
    from cotune.config import to_toml
    from cotune.runtime.experiment import load_experiment

    sys.stdout.write(to_toml(load_experiment(args.config, args.set)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cotune.runtime.experiment import export_run

    export = export_run(args.run_dir, out=args.out, merge=args.merge)
    if export.format == "peft-adapter":
        print(f"peft adapter: {export.path} (base model: {export.base})")
    else:
        print(f"transformers model: {export.path}")
    for note in export.notes:
        print(f"  note: {note}")
    print(f"how to load it: {export.path / 'README.md'}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from cotune.attack import attack_run

    r = attack_run(args.run_dir, before=args.before, steps=args.steps, examples=args.examples,
                   hidden=args.hidden)  # fmt: skip
    print(f"{r['device_rows']} token rows of {r['device_examples']} device examples "
          f"(cut {r['cut']}, codec {r['codec']}, {r['device_weights']} device weights, "
          f"noise std {r['noise_std']:.3g})")  # fmt: skip
    print(f"  exact tokens recovered: {r['token_recovery']:.1%} "
          f"(floor: most frequent public token {r['floor_majority']:.1%})")  # fmt: skip
    if r.get("informative_recovery") is not None:
        print(f"  label-informative tokens recovered: {r['informative_recovery']:.1%} "
              f"(e.g. {', '.join(r['informative_tokens'][:8])})")  # fmt: skip
    print(f"written: {os.path.join(args.run_dir, 'attack.json')}")
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
        "Also accepted: any transformers text encoder or causal LM, as a save_pretrained "
        "folder or a hub id (downloaded unless --offline); split, splitfed and fedpft need "
        "one of the families above."
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
    from cotune.runtime.launcher import process_env
    from cotune.runtime.process_allocator import ensure_process_allocator
    from cotune.runtime.split.serve import serve_forever

    process_env()
    cfg = load_experiment(args.config, [*args.set, *_cap_sets(args)])
    ensure_process_allocator(cfg)
    return serve_forever(cfg, args.listen, out=args.out, port_file=args.port_file)


def cmd_device(args: argparse.Namespace) -> int:
    from cotune.link.errors import LinkError
    from cotune.report import read_summary
    from cotune.runtime.experiment import load_experiment, run_experiment

    sets = [*args.set, *_cap_sets(args), f'runtime.cloud="{args.cloud}"',
            f"runtime.device_id={args.device_id}"]  # fmt: skip
    sets.append('runtime.transport="grpc"')
    cfg = load_experiment(args.config, sets)
    if args.data:
        from cotune.runtime.experiment import use_own_data

        cfg = use_own_data(cfg, args.data)
    from cotune.runtime.process_allocator import ensure_process_allocator

    ensure_process_allocator(cfg)
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


def cmd_memory(args: argparse.Namespace) -> int:
    from cotune.report.memory import format_breakdown
    from cotune.runtime.memory_report import measure_memory, memory_config
    from cotune.runtime.process_allocator import ensure_process_allocator

    ensure_process_allocator(memory_config(args.config, args.set, args.steps))
    path, breakdown = measure_memory(args.config, args.set, steps=args.steps, out=args.out)
    print(format_breakdown(breakdown))
    from cotune.report import read_summary

    print(f"allocator: {read_summary(path).get('allocator', 'unknown')} (memory.allocator)")
    print(f"run folder: {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from cotune.planner import PlanRequest, make_plan, network_from_args
    from cotune.planner.speed import profile_gflops
    from cotune.planner.table import format_plan, write_pick
    from cotune.runtime.experiment import load_experiment

    torch.set_num_threads(1)
    network = None
    if args.network or args.up_mbps is not None or args.down_mbps is not None:
        network = network_from_args(args.network, args.up_mbps, args.down_mbps, args.latency_ms)
    for name in ("gflops", "cloud_gflops"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
    budget = parse_memory_size(args.memory, "--memory") if args.memory else None
    if args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    cfg = load_experiment(args.config, args.set)
    gflops = args.gflops
    if args.profile:
        gflops = profile_gflops(cfg, cfg.train.batch_size, cfg.train.max_seq_len)
        print(f"device compute: {gflops:.1f} GFLOP/s (one {cfg.model.name} layer, forward and "
              f"backward, batch {cfg.train.batch_size} x {cfg.train.max_seq_len}, 1 thread)")  # fmt: skip
        if budget is None and network is None:
            return 0
    if budget is None or network is None or gflops is None:
        raise UserError(
            "cotune plan needs --memory SIZE, a network (--network PROFILE, or --up-mbps and "
            "--down-mbps) and the device's speed (--gflops G, or --profile on the device)"
        )
    req = PlanRequest(budget_mib=budget, gflops=gflops,
                      cloud_gflops=args.cloud_gflops or 10 * gflops, network=network,
                      devices=args.devices, max_cost=args.max_cost)  # fmt: skip
    plan = make_plan(cfg, req)
    print(format_plan(plan, top=args.top))
    if args.write:
        chosen = write_pick(plan, args.pick, args.write)
        print(f"\nwrote {args.write}: #{args.pick}, {chosen.label}")
    return 0


MAX_MEMORY_HELP = (
    "the device's memory cap, e.g. 1.5GiB or 800MiB (memory.max_device_mib): the need is "
    "measured before training and a run that does not fit stops with status 2, listing "
    "settings measured to fit"
)


def version_line() -> str:
    """`cotune --version`: cotune's version, the libraries it runs with, its git commit."""
    from cotune.runtime.provenance import git_commit, versions

    v = versions()
    libs = ", ".join(f"{k} {v[k] or 'absent'}" for k in ("torch", "transformers", "peft", "flwr"))
    git = git_commit()
    at = f", git {git['commit'][:12]}{' (modified)' if git['dirty'] else ''}" if git else ""
    return f"cotune {v['cotune']} (python {v['python']}, {libs}{at})"


class _Version(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(version_line())
        parser.exit()


OFFLINE_HELP = (
    "never use the Hugging Face hub, in this process and every process it starts (as "
    "HF_HUB_OFFLINE=1): a hub model id must be in the local HF cache. Without it a hub id "
    "is downloaded when the hub is reachable; zoo models, local folders and data sets "
    "never use the network either way (hf:<id> data sets excepted)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cotune",
        description="Fine-tune foundation models across weak devices and a cloud.",
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0,
        help="print cotune's version, the library versions it runs with and its git commit",
    )  # fmt: skip
    parser.add_argument(
        "--quiet", action="store_true",
        help="no step bars and no line per evaluation or round (for scripts; errors still print)",
    )  # fmt: skip
    parser.add_argument("--offline", action="store_true", help=OFFLINE_HELP)
    # also accepted after the command (`cotune run --offline ...`); SUPPRESS keeps a
    # command's parser from resetting a flag given before the command
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--offline", action="store_true", default=argparse.SUPPRESS,
                        help=OFFLINE_HELP)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="run an experiment from a TOML config")
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
        help="continue RUN_DIR from its last checkpoint (centralized and the federated "
        "methods; split and splitfed runs cannot resume), with its config",
    )
    p.add_argument(
        "--seeds",
        metavar="SEEDS",
        help="repeat the run once per seed (e.g. 0,1,2 or 0-4) into --out DIR/seed-S, then "
        "write DIR/aggregate.json: per metric the mean, sample std and 95%% t-interval "
        "across seeds; seeds already finished in DIR are not run again",
    )
    p.add_argument("--max-memory", metavar="SIZE", help=MAX_MEMORY_HELP)
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep",
        parents=[common],
        help="run a grid of config values (x seeds), each as its own `cotune run` process",
        description="Run every combination of the --grid values (times every --seeds seed) "
        "as its own `cotune run` child process, at most --parallel at once (each with "
        "train.threads = 1 when more than one), into OUT/<key=value>__.../seed-S, then "
        "aggregate each combination (OUT/<combination>/aggregate.json) and compare them. "
        "Finished runs are skipped, so the same command resumes an interrupted sweep.",
    )
    p.add_argument("config", nargs="?", help="TOML config file (defaults apply if omitted)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        required=True,
        metavar="KEY=V1,V2",
        help="a config key and its values, parsed as TOML like --set, e.g. "
        "--grid train.lr=1e-3,2e-3 (repeatable: the grid is every combination)",
    )
    p.add_argument("--seeds", metavar="SEEDS", help="seeds of every combination (e.g. 0,1,2)")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at once (default 1)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key in every run (repeatable)",
    )  # fmt: skip
    p.add_argument("--out", help="sweep folder (default runs/<timestamp>-<name>-sweep)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "compare",
        parents=[common],
        help="compare finished runs and seed groups",
        description="A table of final metrics, bytes, memory and time, and a plot of the "
        "primary metric against bytes on the wire. A seed group (a folder with "
        "aggregate.json, a sweep folder, or run folders of one config differing only in "
        "seed) shows mean ± half-width of its 95% t-interval across seeds and n, and an error "
        "bar in the plot; with exactly two entries evaluated on the same examples, the "
        "paired bootstrap interval of their difference (primary metric, first eval split) "
        "is printed with whether it excludes 0.",
    )
    p.add_argument("runs", nargs="+", help="run folders, seed-group folders or sweep folders")
    p.add_argument("--plot", help="where to write the comparison plot (PNG)")
    p.add_argument(
        "--resamples", type=int, default=2000, metavar="B",
        help="bootstrap resamples of the paired difference (default 2000)",
    )  # fmt: skip
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="run a folder of configs (one row each) and write a comparison page",
        description="Run every *.toml config of CONFIGS (default examples/demo: BBC News "
        "with MiniLM centralized, split with the SFT cut, and fedlora over 4 devices) into "
        "OUT/<config name>/, then write OUT/index.html (a table of accuracy, bytes up and "
        "down, device peak memory, device trainable parameters and wall time, and a plot "
        "of accuracy against bytes on the wire) and print the table. Every config is "
        "checked before the first one runs.",
    )
    p.add_argument(
        "configs", nargs="?", default="examples/demo",
        help="folder of cotune TOML configs, one per row (default examples/demo)",
    )  # fmt: skip
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key in every row, e.g. --set train.steps=20 (repeatable)",
    )  # fmt: skip
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "config",
        parents=[common],
        help="print every config key with its default and help, or a config resolved",
        description="With --defaults: the whole config schema as TOML, every key at its "
        "default after comments saying what it does and what is valid (keys unset by "
        "default commented out); parsed back it is the default config. With CONFIG: that "
        "file resolved against its method, with --set overrides, as a run would record it.",
    )
    p.add_argument("config", nargs="?", help="a TOML config file to print resolved")
    p.add_argument(
        "--defaults", action="store_true",
        help="print every key of the schema with its default and help text (TOML)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "memory",
        parents=[common],
        help="where the device's training memory goes: a short run with memory.report on",
        description="Train CONFIG for --steps steps with memory.report = true and print the "
        "breakdown of the device process's peak RSS: runtime at rest, parameters, optimizer "
        "state, gradients and saved activations alive at the peak, transient buffers, data, "
        "allocator retention. Split methods run their device as its own process (loopback "
        "gRPC), so the cloud is not counted.",
    )
    p.add_argument("config", nargs="?", help="TOML config file (defaults apply if omitted)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument("--steps", type=int, default=5, help="training steps to measure (default 5)")
    p.add_argument("--out", help="run folder (default runs/<timestamp>-<name>-memory)")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser(
        "export",
        parents=[common],
        help="write a finished run's trained model as a folder transformers / peft load",
        description="Rebuild the model RUN_DIR trained from its saved weights and its "
        "config.toml, and write it (default RUN_DIR/model, what every run writes at its end): "
        "a peft adapter plus its base model folder under LoRA, or a transformers model "
        "(full fine-tuning, or --merge). Classifiers are transformers custom code "
        "(trust_remote_code=True). README.md in the folder says how to load it.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holds config.toml)")
    p.add_argument(
        "--merge", action="store_true",
        help="merge the LoRA adapter into the base weights: one model, loaded without peft",
    )  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="where to write it (default RUN_DIR/model)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "attack",
        parents=[common],
        help="how much of a split run's input the cloud recovers from the cut rows",
        description="An honest-but-curious cloud trains an inverter on public text "
        "(BBC News) through its own copy of the device segment, the codec and the run's "
        "noise, then maps the rows the device sends for its own data back to tokens; "
        "prints and writes RUN_DIR/attack.json: exact-token recovery, recovery of the "
        "label-informative tokens, and the floors.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished split run folder")
    p.add_argument("--before", action="store_true",
                   help="the device's initial weights (before fine-tuning)")  # fmt: skip
    p.add_argument("--steps", type=int, default=1500, help="inverter training steps")
    p.add_argument("--examples", type=int, default=500, help="device examples attacked")
    p.add_argument("--hidden", type=int, default=0,
                   help="hidden width of the inverter (0: linear)")  # fmt: skip
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser(
        "models", parents=[common], help="list the models available and where they come from"
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("tasks", parents=[common], help="list the tasks and their metrics")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("methods", parents=[common], help="list the methods and what they do")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser(
        "cloud", parents=[common], help="serve the cloud side of split training over gRPC"
    )
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
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    p.set_defaults(func=cmd_cloud)

    p = sub.add_parser(
        "device", parents=[common], help="train as a device of a split cloud over gRPC"
    )
    p.add_argument("--config", help="TOML config (the same file the cloud uses)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument("--cloud", required=True, metavar="HOST:PORT", help="address of `cotune cloud`")
    p.add_argument("--device-id", type=int, default=0, help="this device's id in the token file")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="this device's own data: a file or folder in the layout of the config's task "
        "(a csv / json file for those tasks, a GLUE TSV folder, a text-folder, ...), used "
        "where task.train_file or task.data_dir would be; a splitfed device trains on all "
        "of it (with train.steps set, the same on every device). Without it the data are "
        "the ones the device's own --config names",
    )
    p.add_argument("--max-memory", metavar="SIZE", help=MAX_MEMORY_HELP)
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    p.add_argument("--out", help="run folder (default runs/<timestamp>-<name>)")
    p.set_defaults(func=cmd_device)

    p = sub.add_parser(
        "plan", parents=[common],
        help="rank configurations (method, cut, codec, LoRA, memory option) for a device",
    )  # fmt: skip
    p.add_argument("config", nargs="?", help="TOML config giving the model, task, batch and length")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument("--memory", metavar="SIZE", help="the device's memory budget, e.g. 1GiB")
    p.add_argument("--gflops", type=float, help="the device's measured speed, GFLOP/s")
    p.add_argument("--profile", action="store_true",
                   help="measure this machine's GFLOP/s (run it on the device)")  # fmt: skip
    p.add_argument("--cloud-gflops", type=float, help="the cloud's speed (default 10x the device)")
    p.add_argument("--network", metavar="PROFILE",
                   help="datacenter | wifi | lte | constrained (explicit values override it)")  # fmt: skip
    p.add_argument("--up-mbps", type=float, help="device -> cloud Mbit/s")
    p.add_argument("--down-mbps", type=float, help="cloud -> device Mbit/s")
    p.add_argument("--latency-ms", type=float, help="one-way latency, ms")
    p.add_argument("--devices", type=int, default=1, help="devices training together")
    p.add_argument("--max-cost", type=float, default=2.0,
                   help="accuracy points above which a configuration ranks last")  # fmt: skip
    p.add_argument("--top", type=int, default=15, help="ranked rows to print")
    p.add_argument("--write", metavar="CONFIG", help="write the chosen configuration as TOML")
    p.add_argument("--pick", type=int, default=1, help="which ranked row --write writes")
    p.set_defaults(func=cmd_plan)

    add_keys_parser(sub, common)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # before anything imports transformers / huggingface_hub (they read these at import)
    from cotune.hub import go_offline
    from cotune.runtime.launcher import process_env

    parser = build_parser()
    args = parser.parse_args(argv)
    process_env()
    if getattr(args, "offline", False):
        go_offline()
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="cotune: %(levelname)s: %(message)s")
    # --quiet holds for this command only: child processes (devices, cloud, Flower)
    # inherit it, and a caller running several commands in one process gets its
    # environment back
    before = os.environ.get(QUIET_ENV)
    if args.quiet:
        os.environ[QUIET_ENV] = "0"
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"cotune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cotune: interrupted", file=sys.stderr)
        return 130
    finally:
        if before is None:
            os.environ.pop(QUIET_ENV, None)
        else:
            os.environ[QUIET_ENV] = before


if __name__ == "__main__":
    sys.exit(main())
