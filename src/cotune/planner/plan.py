"""The candidate configurations, their predictions, and the ranking.

Candidates (for a text classification task): centralized as the reference (the whole
model trained on the device alone), split at every cut with the codecs `identity`,
`int8` and `sft` r8 with an int8 code, fedavg (full fine-tuning), fedlora (LoRA r8) and
splitfed (LoRA r8; its own rules decide whether it applies), each with full fine-tuning
or LoRA r8 where the method allows both and each `[memory]` option of `MEMORY_OPTIONS`.

A configuration whose predicted device peak is above the budget is excluded with the
reason; one the method's rules refuse is excluded with the rule's message. The rest are
ranked: measured accuracy cost at most `max_cost` points first, then not measured, then
above `max_cost`; within each group by projected time per epoch.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

from cotune.config import Config
from cotune.config.load import build_config
from cotune.data.registry import load_task
from cotune.errors import UserError
from cotune.link.network import exchange_s
from cotune.methods.registry import resolve
from cotune.models.zoo import load_tokenizer
from cotune.planner import evidence
from cotune.planner.calibration import Calibration, load_calibration
from cotune.planner.facts import DeviceFacts, FactFinder
from cotune.planner.inputs import PlanRequest
from cotune.planner.predict import Shape, compute_s, network_s, peak_mib
from cotune.planner.wire import split_step_bytes, state_bytes

LORA = {"r": 8, "alpha": 16, "dropout": 0.1}
MEMORY_OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "checkpoint": {"checkpoint": True},
    "norm@0.1": {"backward": "norm", "keep": 0.1},
    "backrazor@0.3": {"backward": "backrazor", "keep": 0.3},
}
CODECS: dict[str, dict[str, Any]] = {
    "identity": {"codec": "identity"},
    "int8": {"codec": "int8"},
    "sft8-int8": {"codec": "sft", "rank": 8, "code_format": "int8"},
}
LENGTH_SAMPLE = 512


@dataclass
class Candidate:
    method: str
    cut: int | None
    codec: str | None
    lora: int | None
    memory: str
    cfg: Config | None = None
    facts: DeviceFacts | None = None
    peak_mib: float = 0.0
    bytes_step: int = 0
    bytes_round: int = 0
    bytes_epoch: int = 0
    step_s: float = 0.0
    epoch_s: float = 0.0
    cost: evidence.Cost = field(default_factory=lambda: evidence.Cost(None, ""))
    excluded: str | None = None

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.cut is not None:
            parts.append(f"cut {self.cut}")
        if self.codec is not None:
            parts.append(self.codec)
        parts.append(f"LoRA r{self.lora}" if self.lora else "full")
        parts.append(f"memory {self.memory}")
        return ", ".join(parts)


@dataclass
class Plan:
    request: PlanRequest
    shape: Shape
    examples: int
    calibration: Calibration
    floor_source: str
    ranked: list[Candidate]
    excluded: list[Candidate]
    reference: list[Candidate]
    note: str


def batch_shape(cfg: Config, examples: list[Any]) -> Shape:
    """The expected padded length and real tokens of a batch, from up to 512 seeded
    training examples tokenized as a run tokenizes them."""
    tok = load_tokenizer(cfg.model.name)
    rng = random.Random(cfg.seed)
    sample = rng.sample(examples, min(LENGTH_SAMPLE, len(examples)))
    lengths = [
        len(tok(e.text_a, e.text_b, truncation=True, max_length=cfg.train.max_seq_len)["input_ids"])
        for e in sample
    ]
    b = cfg.train.batch_size
    padded = [max(rng.choices(lengths, k=b)) for _ in range(200)]
    mean = sum(lengths) / len(lengths)
    return Shape(batch=b, length=round(sum(padded) / len(padded)), tokens=round(b * mean))


def candidate_config(base: Config, c: Candidate, devices: int) -> Config:
    """`base` with the candidate's method, cut, codec, LoRA and memory option."""
    data = base.model_dump(mode="json", exclude_none=True)
    data["method"] = c.method
    model = dict(data.get("model", {}))
    model.pop("lora", None)
    if c.lora:
        model["lora"] = {**LORA, "r": c.lora}
    data["model"] = model
    data["memory"] = {**data.get("memory", {}), "backward": "none", "checkpoint": False,
                      **MEMORY_OPTIONS[c.memory]}  # fmt: skip
    if c.cut is not None:
        data["split"] = {**data.get("split", {}), "cut": c.cut, "labels": "cloud"}
    if c.codec is not None:
        data["link"] = {**data.get("link", {}), **CODECS[c.codec]}
    if c.method in ("fedavg", "fedlora", "splitfed"):
        data["federated"] = {**data.get("federated", {}), "clients": devices}
    for key in ("federated", "split", "link"):  # what the method does not read
        if key in data and not data[key]:
            data.pop(key)
    with warnings.catch_warnings():  # sections the base has and the method does not read
        warnings.simplefilter("ignore", UserWarning)
        return resolve(build_config(data))


def candidates(n_layers: int) -> list[Candidate]:
    out = []
    for mem in MEMORY_OPTIONS:
        for lora in (None, 8):
            out.append(Candidate("centralized", None, None, lora, mem))
            for cut in range(1, n_layers):
                for codec in CODECS:
                    out.append(Candidate("split", cut, codec, lora, mem))
        out.append(Candidate("fedavg", None, None, None, mem))
        out.append(Candidate("fedlora", None, None, 8, mem))
        out.append(Candidate("splitfed", n_layers // 2, "int8", 8, mem))
    return out


def _evaluate(
    c: Candidate, base: Config, finder: FactFinder, req: PlanRequest, shape: Shape,
    examples: int, cal: Calibration,
) -> None:  # fmt: skip
    try:
        c.cfg = candidate_config(base, c, req.devices)
        c.facts = f = finder.facts(c.cfg, split=c.method in ("split", "splitfed"))
    except UserError as err:
        c.excluded = f"refused by the method's rules: {err}"
        return
    except (AttributeError, RuntimeError, ValueError) as err:  # a build cotune cannot measure
        c.excluded = f"not measurable by the planner: {type(err).__name__}: {err}"
        return
    c.peak_mib = peak_mib(f, shape.batch, c.cfg.train.optimizer, cal)
    one_device = c.method in ("centralized", "split")
    per_device = examples if one_device else math.ceil(examples / req.devices)
    steps = math.ceil(per_device / shape.batch)
    comp = compute_s(f, shape, req.gflops, req.cloud_gflops, cal)
    net = req.network
    if c.method in ("split", "splitfed"):
        b = split_step_bytes(c.cfg.link, batch=shape.batch, length=shape.length,
                             real_tokens=shape.tokens, width=f.width)  # fmt: skip
        c.bytes_step = b.total
        c.step_s = comp + network_s(net, [b.up], [b.down])
    else:
        c.step_s = comp
    if c.method in ("fedavg", "fedlora", "splitfed"):
        state = state_bytes(f.trainable_shapes)
        c.bytes_round = 2 * state * req.devices
        round_net = exchange_s(net, [state], [state])
    else:
        round_net = 0.0
    c.epoch_s = steps * c.step_s + round_net
    if c.method == "splitfed":  # the shared cloud serves every device's steps in turn
        cloud = compute_s(_cloud_only(f), shape, req.gflops, req.cloud_gflops, cal)
        c.epoch_s = steps * max(c.step_s, req.devices * cloud) + round_net
    c.bytes_epoch = c.bytes_step * steps * (1 if one_device else req.devices) + c.bytes_round
    c.cost = _cost(c)
    if c.peak_mib > req.budget_mib:
        c.excluded = f"needs {c.peak_mib:,.0f} MiB > budget {req.budget_mib:,.0f} MiB"


def _cloud_only(f: DeviceFacts) -> DeviceFacts:
    from dataclasses import replace

    from cotune.planner.facts import PartFlops

    return replace(f, device_flops=PartFlops(0.0, 0.0), trainable=0)


def _cost(c: Candidate) -> evidence.Cost:
    mem = MEMORY_OPTIONS[c.memory]
    if c.method == "split" and c.cut is not None and c.codec is not None:
        cost = evidence.split_cost(c.cut, c.codec)
        if c.lora:
            cost = cost.plus(evidence.method_cost("centralized", True))
    else:
        cost = evidence.method_cost(c.method, bool(c.lora))
    return cost.plus(
        evidence.memory_cost(
            mem.get("backward", "none"), mem.get("keep"), bool(mem.get("checkpoint"))
        )
    )


def _rank_key(c: Candidate, max_cost: float) -> tuple[int, float]:
    p = c.cost.points
    group = 1 if p is None else (0 if p <= max_cost else 2)
    return (group, c.epoch_s)


def make_plan(base: Config, req: PlanRequest) -> Plan:
    """Evaluate every candidate for `base` (model, task, batch, length, data)."""
    task = load_task(base.task, base.seed)
    if task.kind != "classification":
        raise UserError(
            f"cotune plan handles text classification tasks for now; {base.task.name} is a "
            f"{task.kind} task"
        )
    cal = load_calibration()
    from cotune.planner.calibration import runtime_floor

    shape = batch_shape(base, task.train)
    finder = FactFinder(task.num_labels, shape.length)
    from cotune.models.classifier import build_classifier
    from cotune.models.cut import num_layers

    n_layers = num_layers(build_classifier(base.model.model_copy(update={"lora": None}),
                                           task.num_labels, seed=base.seed)[0])  # fmt: skip
    cands = candidates(n_layers)
    for c in cands:
        _evaluate(c, base, finder, req, shape, len(task.train), cal)
    ref = [c for c in cands if c.method == "centralized"]
    rest = [c for c in cands if c.method != "centralized"]
    ranked = sorted(
        (c for c in rest if c.excluded is None), key=lambda c: _rank_key(c, req.max_cost)
    )
    excluded = sorted((c for c in rest if c.excluded is not None), key=lambda c: c.peak_mib)
    if not ranked:
        fits = [c for c in excluded if c.facts is not None]
        smallest = min(fits, key=lambda c: c.peak_mib) if fits else None
        need = (f"; the smallest is {smallest.label}, which needs {smallest.peak_mib:,.0f} MiB"
                if smallest else "")  # fmt: skip
        raise UserError(
            f"no configuration fits a device memory budget of {req.budget_mib:,.0f} MiB{need}"
        )
    return Plan(
        request=req, shape=shape, examples=len(task.train), calibration=cal,
        floor_source=runtime_floor()[1], ranked=ranked, excluded=excluded, reference=ref,
        note=evidence.applies_to(base.model.name, base.task.name),
    )  # fmt: skip
