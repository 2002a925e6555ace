"""A one-page HTML report of a run: summary, plot, evaluations, resolved config."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from cotune.report.memory import breakdown_html


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "kB", "MB", "GB", "TB"):  # SI (powers of 1000), as everywhere in cotune
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def write_report(
    run_dir: Path, summary: dict[str, Any], evals: list[dict[str, Any]], config_text: str
) -> Path:
    rows = [
        ("method", summary["method"]),
        ("task", summary["task"]),
        ("model", summary["model"]),
        *[(f"metric: {k}", _fmt(v)) for k, v in summary["metrics"].items()],
        ("bytes up (device -> cloud)", human_bytes(summary["comm"]["bytes_up"])),
        ("bytes down (cloud -> device)", human_bytes(summary["comm"]["bytes_down"])),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("device peak memory", human_bytes(summary.get("device_peak_bytes"))),
        ("saved activations / step", human_bytes(summary.get("saved_activation_bytes"))),
        ("trainable params", _fmt(summary["trainable_params"])),
    ]
    table = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    cols = sorted({k for r in evals for k in r}, key=lambda k: (k not in ("step", "round"), k))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
        for r in evals
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cotune: {html.escape(summary["method"])} on {html.escape(summary["task"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }}
th {{ background: #f3f3f3; }}
pre {{ background: #f7f7f7; padding: 1em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(summary["method"])} &middot; {html.escape(summary["task"])} &middot; {html.escape(summary["model"])}</h1>
<h2>Summary</h2>
<table>{table}</table>
{breakdown_html(summary.get("memory_breakdown"))}
<h2>Curves</h2>
<img src="plot.png" alt="loss, metrics and traffic over training">
<h2>Evaluations</h2>
<table><tr>{head}</tr>
{body}</table>
<h2>Resolved config</h2>
<pre>{html.escape(config_text)}</pre>
<h2>Raw summary</h2>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out
