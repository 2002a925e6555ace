"""`cotune plan`'s output: the ranked table, the excluded configurations, `--write`."""

from __future__ import annotations

from pathlib import Path

from cotune.config import to_toml
from cotune.config.load import load_config
from cotune.errors import UserError
from cotune.planner.plan import Candidate, Plan


def _bytes(n: int) -> str:
    if n == 0:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _time(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def _cost(c: Candidate) -> str:
    p = c.cost.points
    return c.cost.source if p is None else f"{p:+.1f} ({c.cost.source})"


def _row(i: str, c: Candidate) -> str:
    f = c.facts
    trainable = f"{f.trainable:,}" if f else "?"
    return (
        f"| {i} | {c.method} | {c.cut or '-'} | {c.codec or '-'} | "
        f"{('r' + str(c.lora)) if c.lora else 'full'} | {c.memory} | {c.peak_mib:,.0f} | "
        f"{trainable} | {_bytes(c.bytes_step)} | {_bytes(c.bytes_round)} | "
        f"{_time(c.step_s)} | {_time(c.epoch_s)} | {_cost(c)} |"
    )


HEADER = (
    "| # | method | cut | codec | LoRA | memory | device peak MiB | device trainable | "
    "bytes/step | bytes/round | step | epoch | accuracy cost, points (source) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_plan(plan: Plan, top: int = 15, excluded: int = 10) -> str:
    req, shape = plan.request, plan.shape
    net = req.network
    lines = [
        f"device: {req.budget_mib:,.0f} MiB, {req.gflops:.1f} GFLOP/s; cloud "
        f"{req.cloud_gflops:.1f} GFLOP/s; network {net.profile or 'custom'} "
        f"({net.up_mbps:g} up / {net.down_mbps:g} down Mbit/s, {net.latency_ms:g} ms); "
        f"{req.devices} device(s); {plan.examples:,} training examples per epoch",
        f"batch {shape.batch} x {shape.length} tokens padded ({shape.tokens} real), "
        "from 512 sampled training examples",
        f"memory: runtime at rest {plan.calibration.runtime_mib:.0f} MiB ({plan.floor_source}); "
        f"constants {plan.calibration.source}",
        "bytes per step: exact (the transport's messages at this shape); memory, time: model "
        "(cotune.planner.predict)",
    ]
    if plan.note:
        lines.append(f"note: {plan.note}")
    lines += ["", "Reference (everything on the device, no network):", HEADER]
    lines += [_row("ref", c) for c in plan.reference if c.excluded is None or c.facts]
    lines += ["", f"Ranked ({len(plan.ranked)} fit; top {min(top, len(plan.ranked))}):", HEADER]
    lines += [_row(str(i + 1), c) for i, c in enumerate(plan.ranked[:top])]
    if plan.excluded:
        lines += [
            "",
            f"Excluded ({len(plan.excluded)}; first {min(excluded, len(plan.excluded))}):",
        ]
        lines += [f"- {c.label}: {c.excluded}" for c in plan.excluded[:excluded]]
    return "\n".join(lines)


def write_pick(plan: Plan, pick: int, path: str | Path) -> Candidate:
    """Write the `pick`-th ranked configuration (1-based) as a TOML file, checked by
    loading it back with cotune's config loader."""
    if not 1 <= pick <= len(plan.ranked):
        raise UserError(f"--pick {pick}: give 1 to {len(plan.ranked)} (the ranked rows)")
    c = plan.ranked[pick - 1]
    assert c.cfg is not None
    text = f"# cotune plan: {c.label}\n" + to_toml(c.cfg)
    Path(path).write_text(text)
    load_config(path)
    return c
