"""`cotune plan`: which configuration fits a device, and what it costs.

Given a model, a task, the device's memory budget and compute speed, a network and the
number of devices, the planner lists method / cut / codec / LoRA rank / memory option
configurations with predicted device peak memory, trainable parameters, bytes per step
and per round, time per epoch and the accuracy cost cotune measured for them.

Modules: `wire` (exact message bytes), `facts` (what a configuration puts on the
device, measured on the built model), `speed` (`--profile`: GFLOP/s), `evidence`
(accuracy costs from benchmarks/results), `calibration` (the fitted constants),
`predict` (memory and time), `plan` (the candidates and their ranking), `table`
(printing and `--write`).
"""

from __future__ import annotations

from cotune.planner.inputs import PlanRequest, network_from_args
from cotune.planner.plan import Plan, make_plan

__all__ = ["Plan", "PlanRequest", "make_plan", "network_from_args"]
