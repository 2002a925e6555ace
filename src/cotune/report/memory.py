"""The memory breakdown of a run (`summary.json`'s `memory_breakdown`) as text and HTML.

The breakdown itself is measured by `cotune.memory.measure` (see `MemoryBreakdown`);
this module only shows it: each part in MiB and as a share of the step's peak RSS.
"""

from __future__ import annotations

from html import escape
from typing import Any

MiB = float(1 << 20)

# part -> what it is, in a user's words
PARTS: dict[str, str] = {
    "runtime_at_rest": "interpreter and libraries at rest (before data and model)",
    "parameters": "parameters and buffers of the device model",
    "optimizer_state": "optimizer state (AdamW: two moments per trainable parameter)",
    "gradients": "gradients alive at the peak",
    "saved_activations": "activations saved for backward, alive at the peak",
    "transient": "transient buffers of forward, backward and the optimizer step",
    "data_and_other": "data, tokenizer and other objects",
    "allocator_retention": "freed memory the allocator still holds",
}


def device_breakdown(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The memory breakdown of a run's summary: its own, or (splitfed: one per device)
    the device's with the highest peak; None if the run did not measure one."""
    if summary.get("memory_breakdown"):
        return dict(summary["memory_breakdown"])
    devices = [
        d["memory_breakdown"] for d in summary.get("devices", []) if d.get("memory_breakdown")
    ]
    return max(devices, key=lambda d: d["peak_rss"]) if devices else None


def breakdown_rows(breakdown: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(part, MiB, share of peak, what it is) per part, then the unexplained rest."""
    peak = float(breakdown["peak_rss"]) or 1.0
    rows = [(k, breakdown[k] / MiB, breakdown[k] / peak, what) for k, what in PARTS.items()]
    rest = breakdown.get("unexplained", peak - sum(breakdown[k] for k in PARTS))
    rows.append(("unexplained", rest / MiB, rest / peak, "peak RSS minus the parts above"))
    return rows


def format_breakdown(breakdown: dict[str, Any] | None) -> str:
    if not breakdown:
        return "no memory breakdown in this run (memory.report = false, or not on glibc)"
    lines = [f"device peak RSS of a training step: {breakdown['peak_rss'] / MiB:,.0f} MiB"]
    for part, mib, share, what in breakdown_rows(breakdown):
        lines.append(f"  {part:<20} {mib:>8,.1f} MiB {share:>6.1%}  {what}")
    return "\n".join(lines)


def breakdown_html(breakdown: dict[str, Any] | None) -> str:
    if not breakdown:
        return ""
    rows = "".join(
        f"<tr><td>{escape(p)}</td><td>{mib:,.1f}</td><td>{share:.1%}</td><td>{escape(w)}</td></tr>"
        for p, mib, share, w in breakdown_rows(breakdown)
    )
    return (
        f"<h2>Device memory at the peak step ({breakdown['peak_rss'] / MiB:,.0f} MiB RSS)</h2>"
        "<table><tr><th>part</th><th>MiB</th><th>of peak</th><th>what</th></tr>"
        f"{rows}</table>"
    )
