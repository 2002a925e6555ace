"""Accuracy costs from cotune's own measured sweeps in benchmarks/results.

Each cost is in accuracy points against centralized full fine-tuning on the same budget
and says where it comes from. Components add up (a model: the sweeps measured each
change alone): the split codec and cut (`split_sweep*`, `split_sft`), the `[memory]`
option (`memory_backward.json`). What no sweep measured is "not measured". All of these
were measured with minilm on SST-2; for another model or task the source says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
MEASURED_ON = ("minilm", "glue/sst2")


@dataclass(frozen=True)
class Cost:
    points: float | None
    """Accuracy points lost against centralized (positive = worse); None: not measured."""
    source: str

    def plus(self, other: Cost) -> Cost:
        if self.points is None or other.points is None:
            known = self if self.points is None else other
            return Cost(None, known.source)
        return Cost(self.points + other.points, f"{self.source}; {other.source}")


@cache
def _read(rel: str) -> Any:
    path = RESULTS / rel
    return json.loads(path.read_text()) if path.is_file() else None


def _rel(rel: str) -> str:
    return f"benchmarks/results/{rel}"


def _sweep_accuracy(rel: str, cut: int | None, codec: str | None) -> float | None:
    data = _read(rel)
    for run in (data or {}).get("runs", []):
        if run.get("cut") == cut and run.get("codec") == codec:
            return float(run["accuracy"])
    return None


def split_cost(cut: int, codec: str) -> Cost:
    """The cut and codec's cost (`codec`: identity, int8 or sft8-int8)."""
    base = _sweep_accuracy("split_sweep/split_sweep.json", None, None)
    if codec == "sft8-int8":
        sft = _read("split_sft/sst2.json")
        arms = (sft or {}).get("arms", {})
        arm = arms.get(f"sft8-int8-cut{cut}")
        if arm and "centralized" in arms:
            a = arm["metrics"]["accuracy"]["mean"]
            c = arms["centralized"]["metrics"]["accuracy"]["mean"]
            return Cost(100 * (c - a), f"measured: {_rel('split_sft/sst2.json')} (3 seeds)")
        acc = _sweep_accuracy("split_sweep_int8/split_sweep.json", cut, "sft8-int8")
        if acc is not None and base is not None:
            return Cost(
                100 * (base - acc), f"measured: {_rel('split_sweep_int8/split_sweep.json')}"
            )
        return Cost(None, f"not measured (sft r8 int8 at cut {cut})")
    acc = _sweep_accuracy("split_sweep/split_sweep.json", cut, codec)
    if acc is None or base is None:
        return Cost(None, f"not measured ({codec} at cut {cut})")
    return Cost(100 * (base - acc), f"measured: {_rel('split_sweep/split_sweep.json')}")


def memory_cost(mode: str, keep: float | None, checkpoint: bool) -> Cost:
    """The `[memory]` option's cost: checkpointing recomputes exactly; sparse modes
    from `memory_backward.json`'s accuracy phase."""
    if mode == "none":
        why = "checkpointing is exact" if checkpoint else "exact backward"
        return Cost(0.0, f"model: {why}")
    data = _read("memory_backward.json") or {}
    acc = data.get("accuracy", {})
    row = acc.get(f"{mode}@{keep:g}") if keep is not None else None
    if row is None or "none" not in acc:
        return Cost(None, f"not measured ({mode} keep {keep})")
    points = 100 * (acc["none"]["accuracy"] - row["accuracy"])
    return Cost(points, f"measured: {_rel('memory_backward.json')}")


def method_cost(method: str, lora: bool) -> Cost:
    """Federated methods and LoRA against centralized full fine-tuning: not measured on
    one budget (federated.json has no centralized arm), so not claimed."""
    if method == "centralized" and not lora:
        return Cost(0.0, "reference")
    what = f"{method}{' with LoRA' if lora else ''} against centralized full fine-tuning"
    return Cost(None, f"not measured ({what})")


def applies_to(model: str, task: str) -> str:
    """A note when the plan's model or task is not what the sweeps measured."""
    if (model, task) == MEASURED_ON:
        return ""
    return f"accuracy costs were measured with {MEASURED_ON[0]} on {MEASURED_ON[1]}, not {model} on {task}"
