"""The run folder contract (README, "The run folder"): config.toml, metrics.jsonl, summary.json,
train.jsonl (dense training loss), predictions.jsonl (the final evaluation, one line per
eval example), plots and report.html."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cotune.report.trackers import Tracker

PREDICTIONS_FILE = "predictions.jsonl"

SUMMARY_KEYS = (
    "method",
    "task",
    "model",
    "metrics",
    "comm",
    "wall_s",
    "device_peak_bytes",
    "trainable_params",
    "saved_activation_bytes",
)


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{name}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunFolder:
    """Writes one run's files. Methods see it only as a recorder (`log_eval`, `log_train`)."""

    def __init__(
        self,
        path: str | Path,
        echo: Callable[[dict[str, Any]], None] | None = None,
        trackers: Sequence[Tracker] = (),
    ) -> None:
        self.path = Path(path)
        self.echo = echo  # called with each evaluation record (progress lines)
        self.trackers = list(trackers)  # TensorBoard, MLflow, W&B (runtime.loggers)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.train_path = self.path / "train.jsonl"
        self.predictions_path = self.path / PREDICTIONS_FILE

    def start_fresh(self) -> None:
        """Forget the records of an earlier run written to the same folder."""
        for path in (
            self.metrics_path, self.train_path, self.predictions_path, self.path / "summary.json"
        ):  # fmt: skip
            path.unlink(missing_ok=True)

    def write_config(self, toml_text: str) -> None:
        (self.path / "config.toml").write_text(toml_text)

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps(_clean(record)) + "\n")

    def log_eval(self, record: dict[str, Any]) -> None:
        """One evaluation (step or round): task metrics, cumulative bytes, wall_s, and
        projected_wall_s (compute + emulated network; wall_s when no network is
        emulated)."""
        missing = {"bytes_up", "bytes_down", "wall_s"} - set(record)
        if missing or not ({"step", "round"} & set(record)):
            raise ValueError(f"eval record lacks {sorted(missing) or ['step or round']}")
        record.setdefault("projected_wall_s", record["wall_s"])
        self._append(self.metrics_path, record)
        if self.echo is not None:
            self.echo(record)
        for tracker in self.trackers:
            tracker.log(record, "eval")

    def log_train(self, record: dict[str, Any]) -> None:
        """Training progress (step, loss, lr, ...), denser than evaluations."""
        self._append(self.train_path, record)
        for tracker in self.trackers:
            tracker.log(record, "train")

    def close_trackers(self) -> None:
        """Flush and close the experiment trackers (at the end of the run)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def write_predictions(self, records: list[dict[str, Any]]) -> None:
        """predictions.jsonl: one line per eval example of the final evaluation
        (`{"split", "index", "label", "prediction"[, "correct"]}`, `{"split", "index",
        "prompt", "output"}` for generation, or `{"split", "index", "id", "question",
        "prediction", "answers", "exact_match", "f1"}` for extractive QA), replacing an
        earlier file."""
        tmp = self.predictions_path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
        tmp.replace(self.predictions_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise ValueError(f"summary lacks {missing}")
        (self.path / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")

    def truncate_after(self, key: str, last: int) -> None:
        """Drop records past `last` (resuming a run from a checkpoint)."""
        for path in (self.metrics_path, self.train_path):
            if path.exists():
                keep = [r for r in read_jsonl(path) if r.get(key, -1) <= last]
                path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def read_predictions(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run folder's predictions.jsonl (empty if the run wrote none)."""
    return read_jsonl(Path(run_dir) / PREDICTIONS_FILE)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
