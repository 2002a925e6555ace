"""Device memory for real: the peak RSS of a device's training step, and where it goes,
for every memory setting cotune has.

Each row is `cotune memory CONFIG --steps N` in a process of its own (the device alone:
split runs put their device in its own process on loopback gRPC), with the breakdown of
the step with the highest peak RSS (`memory.report`): runtime at rest, parameters,
optimizer state, gradients and saved activations alive at the peak, transient buffers,
data, allocator retention. Settings:

- minilm full fine-tuning and minilm LoRA (r8 on query/key/value/dense), BBC News,
  batch 16 x 128 tokens (every row 128 real tokens);
- the smollm2-135m split device segment (cut 3, LoRA r4), E2E, batch 4 x 64;
- memory modes none / checkpoint / norm and backrazor at keep 0.1 and 0.3 / checkpoint
  combined with each sparse mode; for LoRA also the frozen base in bf16 and int8;
  `none` and the best mode once more with glibc's default allocator settings, and the
  main modes on jemalloc (`memory.allocator = "jemalloc"`); for full fine-tuning also
  the optimiser stepped inside backward (`memory.step_in_backward`, "+step-in-bwd":
  each parameter's gradient freed once it has stepped; no gradient clipping; embedding
  tables with sparse gradients), alone and with the checkpointed layers run over 4 or 8
  slices of the batch ("/chunksN", `memory.checkpoint_chunks`).

`--repeats N` runs every row of the selected groups N times (each a process of its own;
repeats 2.. in `<row>-rep2`, ...): the table gives the median run (its breakdown) and the
range of the peaks. The smollm2 device needs it: with an fp32 base its token table is a
view over the memory-mapped checkpoint, and how much of it is resident depends on the
rows the text touches and on the kernel's fault-around, not on the memory mode.

Step time is the median step of the row's run, its ratio taken against `none` of the
same group; rows run one after another, but the machine is shared, so the ratios are
indicative (the step-time benchmark of record is memory_backward.py's interleaved one).

    nice .venv/bin/python benchmarks/device_memory.py [--steps 6] [--only minilm-full]
    nice .venv/bin/python benchmarks/device_memory.py --only smollm2-split-device --repeats 3
    .venv/bin/python benchmarks/device_memory.py --table      # JSON + Markdown from finished rows

Writes benchmarks/results/device_memory.json (+ .md); rows are resumable (a finished
row's run folder is kept under benchmarks/results/device_memory/<group>/<row>).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from cotune.config import load_config
from cotune.models.zoo import resolve
from cotune.report.memory import device_breakdown

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "device_memory"
MiB = float(1 << 20)

SPARSE = {
    "norm@0.1": ['memory.backward="norm"', "memory.keep=0.1"],
    "norm@0.3": ['memory.backward="norm"', "memory.keep=0.3"],
    "norm@0.5": ['memory.backward="norm"', "memory.keep=0.5"],
    "backrazor@0.1": ['memory.backward="backrazor"', "memory.keep=0.1"],
    "backrazor@0.3": ['memory.backward="backrazor"', "memory.keep=0.3"],
}
MODES: dict[str, list[str]] = {
    "none": [],
    "checkpoint": ["memory.checkpoint=true"],
    **SPARSE,
    **{f"checkpoint+{k}": ["memory.checkpoint=true", *v] for k, v in SPARSE.items()},
}
DEFAULT_ALLOCATOR = ['memory.allocator="default"']
JEMALLOC = ['memory.allocator="jemalloc"']
# the optimiser stepped inside backward (no global-norm clipping: the norm is never known)
IN_BACKWARD = ["memory.step_in_backward=true", "train.max_grad_norm=0"]


# checkpointed layers run over n slices of the batch (memory.checkpoint_chunks)
def CHUNKS(n: int) -> list[str]:  # noqa: N802
    return [f"memory.checkpoint_chunks={n}"]


MINILM_BATCHES = ["train.batch_size=16", "train.max_seq_len=128"]  # 16 x 128 real tokens
MINILM = [*MINILM_BATCHES, "train.threads=1"]
LORA = ['model.lora={r = 8, alpha = 16, dropout = 0.1, target_modules = ["query", "key", "value", "dense"]}',
        "train.lr=2e-3"]  # fmt: skip


def groups() -> dict[str, tuple[str, list[str], dict[str, list[str]]]]:
    """group -> (config, common sets, rows)."""
    bbc = str(ROOT / "examples" / "bbc-news-centralized.toml")
    e2e = str(ROOT / "examples" / "e2e-splitfed.toml")
    full_rows = {**MODES, "none/glibc-default": DEFAULT_ALLOCATOR,
                 "norm@0.1/glibc-default": [*SPARSE["norm@0.1"], *DEFAULT_ALLOCATOR],
                 **{f"{m}/jemalloc": [*MODES[m], *JEMALLOC]
                    for m in ("none", "checkpoint", "norm@0.1", "checkpoint+norm@0.1")},
                 **{f"{m}+step-in-bwd": [*MODES[m], *IN_BACKWARD]
                    for m in ("none", "checkpoint", "norm@0.1", "backrazor@0.1",
                              "checkpoint+norm@0.1")},
                 **{f"{m}+step-in-bwd/jemalloc": [*MODES[m], *IN_BACKWARD, *JEMALLOC]
                    for m in ("norm@0.1", "checkpoint+norm@0.1")},
                 **{f"{m}/chunks{n}+step-in-bwd": [*MODES[m], *IN_BACKWARD, *CHUNKS(n)]
                    for m in ("checkpoint", "checkpoint+norm@0.1", "checkpoint+backrazor@0.1")
                    for n in (4, 8)}}  # fmt: skip
    lora_rows: dict[str, list[str]] = {}
    for dtype in ("fp32", "bf16", "int8"):
        for mode in (
            "none",
            "checkpoint",
            "norm@0.1",
            "backrazor@0.1",
            "backrazor@0.3",
            "checkpoint+norm@0.1",
        ):
            lora_rows[f"{mode}/{dtype}"] = [*MODES[mode], f'model.base_dtype="{dtype}"']
    for dtype in ("fp32", "int8"):
        lora_rows[f"checkpoint+norm@0.1/{dtype}/chunks4"] = [
            *MODES["checkpoint+norm@0.1"],
            f'model.base_dtype="{dtype}"',
            *CHUNKS(4),
        ]
    # keep 0.5 under checkpointing: only layer inputs are saved, so the larger keep costs
    # memory only inside the recomputed layer (the accuracy arm lora-int8-ckpt-norm0.5)
    for dtype in ("fp32", "int8"):
        lora_rows[f"checkpoint+norm@0.5/{dtype}"] = [
            *MODES["checkpoint+norm@0.5"],
            f'model.base_dtype="{dtype}"',
        ]
    lora_rows["checkpoint+norm@0.5/int8/chunks4"] = [
        *MODES["checkpoint+norm@0.5"],
        'model.base_dtype="int8"',
        *CHUNKS(4),
    ]
    # checkpointing alone over slices of the batch: exact gradients (the accuracy of
    # lora-int8) at a lower peak; and backrazor 0.3 under checkpointing
    for n in (4, 8):
        lora_rows[f"checkpoint/int8/chunks{n}"] = [
            *MODES["checkpoint"],
            'model.base_dtype="int8"',
            *CHUNKS(n),
        ]
    lora_rows["checkpoint+backrazor@0.3/int8"] = [
        *MODES["checkpoint+backrazor@0.3"],
        'model.base_dtype="int8"',
    ]
    lora_rows["checkpoint+backrazor@0.3/int8/chunks4"] = [
        *MODES["checkpoint+backrazor@0.3"],
        'model.base_dtype="int8"',
        *CHUNKS(4),
    ]
    for mode in ("none", "norm@0.1", "checkpoint+norm@0.1"):
        lora_rows[f"{mode}/int8/jemalloc"] = [*MODES[mode], 'model.base_dtype="int8"', *JEMALLOC]
    split_rows = {m: MODES[m] for m in ("none", "checkpoint", "norm@0.1", "backrazor@0.1",
                                        "backrazor@0.3", "checkpoint+norm@0.1")}  # fmt: skip
    split_rows.update({f"{m}/jemalloc": [*MODES[m], *JEMALLOC] for m in ("none", "norm@0.1")})
    # the device segment's frozen base in bf16 / int8 (LoRA trains on top)
    split_rows.update({f"{m}/{dtype}": [*MODES[m], f'model.base_dtype="{dtype}"']
                       for dtype in ("bf16", "int8")
                       for m in ("none", "norm@0.1", "checkpoint+norm@0.1")})  # fmt: skip
    split_sets = ['method="splitfed"', "split.cut=3", "train.batch_size=4", "train.max_seq_len=64",
                  "train.threads=1", "federated.clients=1"]  # fmt: skip
    return {
        "minilm-full": (bbc, MINILM, full_rows),
        "minilm-lora": (bbc, [*MINILM, *LORA], lora_rows),
        "smollm2-split-device": (e2e, split_sets, split_rows),
    }


def step_seconds(summary: dict[str, Any]) -> float | None:
    """Seconds per training step: the median a centralized run records, else training
    time over steps (a split run: its device's own, as the device process measured it)."""
    if summary.get("step_s_median"):
        return float(summary["step_s_median"])
    timed = (summary.get("devices") or [summary])[0]
    if timed.get("train_s") and timed.get("steps"):
        return float(timed["train_s"]) / int(timed["steps"])
    return None


def prepare_model(config: str, sets: list[str]) -> None:
    """Convert a packaged model (SmolLM2's GGUF) into the cotune cache before the group's
    first row, so that no measured process converts it: on a fresh machine the first
    SmolLM2 row did, and peaked at 689 MiB against 572-580 in its other runs."""
    resolve(load_config(config, sets).model.name)


def run_row(config: str, sets: list[str], out: Path, steps: int) -> dict[str, Any] | None:
    if not (out / "summary.json").is_file():
        args = [sys.executable, "-m", "cotune", "memory", config, "--steps", str(steps),
                "--out", str(out)] + [x for s in sets for x in ("--set", s)]  # fmt: skip
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"  FAILED: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}")
            return None
    summary = json.loads((out / "summary.json").read_text())
    b = device_breakdown(summary)
    return {
        "peak_rss_mib": (b or {}).get("peak_rss", summary.get("device_peak_bytes", 0)) / MiB,
        "breakdown_mib": {k: v / MiB for k, v in (b or {}).items()},
        "saved_activation_mib": (summary.get("saved_activation_bytes") or 0) / MiB,
        "step_s_median": step_seconds(summary),
        "trainable_device": summary["trainable_params"]["device"],
        "device_weight_bytes": summary.get("device_weight_bytes"),
    }


def repeat_dirs(out: Path, repeats: int) -> list[Path]:
    """The row's run folders: `out`, then `out-rep2` .. `out-repN`, and any repeats an
    earlier invocation left."""

    def number(path: Path) -> int:
        return int(path.name.rsplit("-rep", 1)[1])

    earlier = [
        d for d in out.parent.glob(f"{out.name}-rep*") if d.name.rsplit("-rep", 1)[1].isdigit()
    ]
    wanted = {out.with_name(f"{out.name}-rep{k}") for k in range(2, repeats + 1)}
    return [out, *sorted(wanted | set(earlier), key=number)]


def median_run(runs: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The run with the median peak (the lower middle one of an even count), with every
    run's peak in `peak_rss_runs_mib` (in run order); None if a run failed."""
    if not runs or any(r is None for r in runs):
        return None  # a failed run fails the row
    done = [r for r in runs if r is not None]
    middle = sorted(done, key=lambda r: r["peak_rss_mib"])[(len(done) - 1) // 2]
    return {**middle, "peak_rss_runs_mib": [r["peak_rss_mib"] for r in done]}


def peak_cell(r: dict[str, Any]) -> str:
    runs = r.get("peak_rss_runs_mib") or [r["peak_rss_mib"]]
    if len(runs) == 1:
        return f"{r['peak_rss_mib']:,.0f}"
    return f"{r['peak_rss_mib']:,.0f} ({min(runs):,.0f}-{max(runs):,.0f}, {len(runs)} runs)"


def table(data: dict[str, Any]) -> str:
    lines = []
    for group, rows in data["groups"].items():
        none = rows.get("none") or rows.get("none/fp32") or {}
        lines += [f"### {group}", "",
                  "| setting | peak RSS (MiB) | vs none | saved at peak | gradients | optimizer | transient | retention | at rest | step time vs none |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in rows.items():
            if r is None:
                lines.append(f"| {name} | failed | | | | | | | | |")
                continue
            b = r["breakdown_mib"]
            ratio = r["peak_rss_mib"] / none["peak_rss_mib"] if none else float("nan")
            t = (
                r["step_s_median"] / none["step_s_median"]
                if none and none.get("step_s_median")
                else float("nan")
            )
            lines.append(
                f"| {name} | {peak_cell(r)} | {ratio:.2f} | {b.get('saved_activations', 0):,.0f} "
                f"| {b.get('gradients', 0):,.0f} | {b.get('optimizer_state', 0):,.0f} | {b.get('transient', 0):,.0f} "
                f"| {b.get('allocator_retention', 0):,.0f} | {b.get('runtime_at_rest', 0):,.0f} | {t:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--only", nargs="*", default=None, help="groups to run (default: all)")
    p.add_argument("--table", action="store_true", help="only collect finished rows")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per row of the selected groups (median and range; default 1)")  # fmt: skip
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                            "steps": args.steps, "groups": {}}  # fmt: skip
    for group, (config, common, rows) in groups().items():
        # a group left out of --only keeps its finished rows in the JSON and the table
        collect_only = args.table or bool(args.only and group not in args.only)
        data["groups"][group] = {}
        if not collect_only:
            prepare_model(config, common)
        for name, sets in rows.items():
            out = OUT / group / name.replace("/", "_").replace("@", "-").replace("+", "_")
            if collect_only and not (out / "summary.json").is_file():
                continue
            print(f"{group} / {name}", flush=True)
            dirs = repeat_dirs(out, 1 if collect_only else args.repeats)
            runs = [run_row(config, [*common, *sets], d, args.steps) for d in dirs
                    if not collect_only or (d / "summary.json").is_file()]  # fmt: skip
            data["groups"][group][name] = median_run(runs)
    path = OUT.parent / "device_memory.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    text = table(data)
    path.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
