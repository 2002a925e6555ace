"""The `cotune demo` comparison page: one row per run folder, a table and a plot.

`demo_rows` reads finished run folders with the comparison machinery (`report.compare`:
`load_entries`, `entry_row`) and adds what the demo shows beyond `cotune compare`: the
device's trainable parameters and a one-line description of each method's setup from
the run's resolved config. `write_demo_page` writes `demo.png` (the primary metric
against bytes on the wire, and wall time: `plots.plot_compare`) and a self-contained
`index.html` (the table, the plot embedded as base64, links to each run's report);
`demo_table` is the same table for the terminal.
"""

from __future__ import annotations

import base64
import html
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from cotune.report.compare import entry_row, load_entries, primary_metric
from cotune.report.html import human_bytes
from cotune.report.plots import plot_compare

PAGE_FILE = "index.html"
PLOT_FILE = "demo.png"
COLUMNS = (
    "row",
    "method",
    "setup",
    "METRIC",
    "bytes up",
    "bytes down",
    "device peak memory",
    "device trainable params",
    "wall time",
)


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def _lora(model: dict[str, Any]) -> str:
    lora = model.get("lora")
    return f"LoRA r={lora['r']}" if isinstance(lora, dict) else "full fine-tuning"


def _budget(train: dict[str, Any]) -> str:
    if train.get("steps"):
        return f"{train['steps']} steps of {train.get('batch_size', '?')}"
    if train.get("epochs"):
        return f"{train['epochs']:g} epochs of batches of {train.get('batch_size', '?')}"
    return "1 epoch"


def describe_setup(cfg: dict[str, Any]) -> str:
    """One line on how a run trained, from its resolved config (`config.toml`)."""
    model, train = cfg.get("model", {}), cfg.get("train", {})
    method = cfg.get("method", "?")
    if method in ("split", "splitfed"):
        link = cfg.get("link", {})
        codec = link.get("codec", "identity")
        cut = cfg.get("split", {}).get("cut", "?")
        code = codec
        if codec in ("sft", "pca"):
            fmt = link.get("code_format", "fp32")
            code = f"{codec} r={link.get('rank')}" + ("" if fmt == "fp32" else f" {fmt}")
        where = f"device: embeddings + layers < {cut}"
        if codec == "sft":
            where += f" + layer {cut}'s attention"
        return f"{where}; cut codec {code}; {_lora(model)}; {_budget(train)}"
    if method.startswith("fed"):
        fed = cfg.get("federated", {})
        local = (
            f"{fed['local_steps']} local steps"
            if fed.get("local_steps")
            else f"{fed.get('local_epochs', 1):g} local epochs"
        )
        return (
            f"{fed.get('clients', '?')} devices ({fed.get('partition', 'iid')}), "
            f"{fed.get('rounds', '?')} rounds of {local}; {_lora(model)}"
        )
    return f"{_lora(model)}; {_budget(train)}"


def demo_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The comparison rows of finished run folders (`compare.entry_row`) with `setup`
    and `trainable_device` added. A folder that is not a finished run is a UserError."""
    rows = []
    for entry in load_entries(list(run_dirs)):
        row = entry_row(entry)
        row["setup"] = describe_setup(_config(entry.runs[0]))
        trainable = entry.summaries[0].get("trainable_params") or {}
        row["trainable_device"] = trainable.get("device")
        rows.append(row)
    return rows


def _params(n: Any) -> str:
    if not isinstance(n, int | float):
        return "n/a"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def row_cells(row: dict[str, Any], metric: str) -> list[str]:
    """A row's cells, in the order of `COLUMNS` (METRIC: the primary metric)."""
    value = row["metrics"].get(metric)
    wall = row.get("wall_s")
    return [
        row["label"],
        row["method"],
        row.get("setup", ""),
        f"{value:.4f}" if isinstance(value, float) else "-",
        human_bytes(row["comm"]["bytes_up"]),
        human_bytes(row["comm"]["bytes_down"]),
        human_bytes(row.get("device_peak_bytes")),
        _params(row.get("trainable_device")),
        f"{wall:.1f} s" if isinstance(wall, int | float) else "-",
    ]


def _headers(metric: str) -> list[str]:
    return [metric if c == "METRIC" else c for c in COLUMNS]


def demo_table(rows: list[dict[str, Any]], title: str = "cotune demo") -> Table:
    """The terminal table of the demo rows."""
    metric = primary_metric(rows)
    table = Table(title=title)
    for col in _headers(metric):
        left = col in ("row", "method", "setup")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    for row in rows:
        table.add_row(*row_cells(row, metric))
    return table


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 5px 9px; font-size: 14px; vertical-align: top; }
th { background: #f1f3f5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; border: 1px solid #eee; }
p.note { color: #555; font-size: 13px; }
"""


_NUM = ' class="num"'


def _html_table(rows: list[dict[str, Any]], metric: str, out: Path) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _headers(metric))
    lines = []
    for row in rows:
        cells = row_cells(row, metric)
        report = Path(row["path"]) / "report.html"
        if report.is_file():
            href = html.escape(Path(os.path.relpath(report.resolve(), out.resolve())).as_posix())
            label = f'<a href="{href}">{html.escape(cells[0])}</a>'
        else:
            label = html.escape(cells[0])
        tds = [f"<td>{label}</td>"] + [
            f"<td{'' if i < 3 else _NUM}>{html.escape(c)}</td>"
            for i, c in enumerate(cells)
            if i > 0
        ]
        lines.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(lines) + "</table>"


def write_demo_page(
    out: str | Path,
    run_dirs: Sequence[str | Path],
    *,
    title: str = "cotune demo",
    intro: str = "",
    notes: Sequence[str] = (),
) -> Path:
    """Write `out/demo.png` and the self-contained `out/index.html` comparing the
    finished runs in `run_dirs`; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = demo_rows(run_dirs)
    metric = primary_metric(rows)
    plot = plot_compare(rows, metric, out / PLOT_FILE)
    png = base64.b64encode(plot.read_bytes()).decode("ascii")
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{f"<p>{html.escape(intro)}</p>" if intro else ""}
<h2>Results</h2>
{_html_table(rows, metric, out)}
<p class="note">bytes up: device to cloud or server, down: back (all devices together);
device peak memory: the peak resident memory of a training device's process; device
trainable params: what a device trains and updates (a federated device: its adapters
and head). Each row links to its run's own report.</p>
{note_html}
<h2>{html.escape(metric)} against bytes on the wire</h2>
<img src="data:image/png;base64,{png}" alt="{html.escape(metric)} against bytes on the wire, and wall time per row">
</body></html>
"""
    path = out / PAGE_FILE
    path.write_text(page)
    return path
