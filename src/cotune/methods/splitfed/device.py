"""One splitfed device: its share of the data, its segment + LoRA, its own optimiser and
LR schedule, the split exchange per step, and adapter averaging every
`federated.aggregate_every` steps (and after the last step)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cotune.config import Config
from cotune.link.errors import LinkClosed, MalformedMessage, ProtocolError
from cotune.link.proto import pb
from cotune.link.transport import Transport
from cotune.link.wire import from_wire, to_wire
from cotune.memory import apply_memory_option
from cotune.memory.measure import PeakRSS
from cotune.methods.federated.data import split_for, task_for
from cotune.methods.federated.seeds import derive_seed
from cotune.methods.lm import encode_pairs, make_lm_loader
from cotune.methods.split.common import DEVICE_STREAM, RngStream
from cotune.methods.split.device import SplitDevice
from cotune.methods.splitfed.cloud import PROBLEM, build_lm_split
from cotune.methods.training import count_tokens, cycle, total_steps

log = logging.getLogger(__name__)

TransportFactory = Callable[[], Transport]


class LMDevice(SplitDevice):
    """`SplitDevice` for a causal LM, plus adapter averaging with the cloud."""

    def aggregate(self, rnd: int, weight: float) -> int:
        """Send this device's trainable tensors for round `rnd`, load the average the
        cloud sends back; returns how many devices it averaged."""
        self._phase("aggregate")
        agg = pb.Aggregate(round=rnd, weight=weight)
        for n, p in self.named.items():
            agg.state[n].CopyFrom(to_wire(p.detach().float()))
        reply = self.transport.request(pb.DeviceMessage(aggregate=agg), self.timeout)
        if reply.WhichOneof("kind") != "averaged":
            raise ProtocolError(f"expected averaged, the cloud sent {reply.WhichOneof('kind')}")
        avg = reply.averaged
        missing = sorted(set(self.named) - set(avg.state))
        if missing:
            raise MalformedMessage(f"averaged.state lacks {missing[:3]}")
        with torch.no_grad():
            for n, p in self.named.items():
                value = from_wire(
                    avg.state[n], f"averaged.state[{n}]", dtypes=("float32",), shape=tuple(p.shape)
                )
                p.copy_(value.to(p.dtype))
        return int(avg.participants)


@dataclass
class DeviceReport:
    """What one device did, measured as it ran."""

    device_id: int
    examples: int
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    intervals: list[tuple[float, float]] = field(default_factory=list)  # perf_counter
    rounds: list[int] = field(default_factory=list)  # participants per averaging round
    train_s: float = 0.0
    tokens: int = 0
    peak_rss_bytes: int = 0
    saved_activation_bytes: int = 0
    trainable: int = 0
    reconnects: int = 0
    meter: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def device_steps(cfg: Config, n_train: int) -> int:
    """Steps every device takes (the same on all, so averaging rounds line up)."""
    per_device = math.ceil(n_train / cfg.federated.clients)
    return total_steps(cfg.train, max(1, math.ceil(per_device / cfg.train.batch_size)))


def is_round_end(step: int, n_steps: int, every: int) -> bool:
    return step % every == 0 or step == n_steps


def run_device(
    cfg: Config,
    device_id: int,
    connect: TransportFactory,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
) -> DeviceReport:
    """Train as device `device_id` (its partition of the training data) to the end."""
    task = task_for(cfg)
    indices = split_for(cfg).clients[device_id]
    split, codec, model, tokenizer = build_lm_split(cfg)
    vocab = int(model.lm.get_output_embeddings().weight.shape[0])
    device = LMDevice(
        cfg, split, codec, connect(), num_labels=vocab, problem=PROBLEM,
        rng=RngStream(cfg.seed + device_id, DEVICE_STREAM),
    )  # fmt: skip
    del split, model  # the device keeps its segment only
    apply_memory_option(device.segment, cfg.memory)
    data = encode_pairs([task.train[i] for i in indices], tokenizer, cfg.train.max_seq_len)
    seed = derive_seed(cfg.seed, "splitfed-device", device_id)
    pad = int(tokenizer.pad_token_id)
    loader = make_lm_loader(data, cfg.train.batch_size, shuffle=True, seed=seed, pad_token_id=pad)
    n_steps = device_steps(cfg, len(task.train))
    report = DeviceReport(device_id=device_id, examples=len(data))
    report.trainable = sum(p.numel() for p in device.params)
    device.connect(n_steps)
    if codec.projection_rank is not None:
        cal = make_lm_loader(data, cfg.train.batch_size, shuffle=True, seed=seed, pad_token_id=pad)
        device.calibrate(
            [b for _, b in zip(range(cfg.link.calibration_batches), cal, strict=False)]
        )
    every = cfg.federated.aggregate_every
    batches = cycle(loader)
    while device.steps_done < n_steps:
        batch = next(batches)
        t0 = time.perf_counter()
        try:
            with PeakRSS() as rss:
                loss = device.train_step(batch)
        except LinkClosed as err:
            report.reconnects += 1
            if report.reconnects > cfg.runtime.reconnect:
                raise
            log.warning("device %s: link dropped (%s); reconnecting", device_id, err)
            device.optimizer.zero_grad(set_to_none=True)
            time.sleep(min(2.0**report.reconnects, 30.0) * 0.1)
            device.connect(n_steps, connect())
            continue
        t1 = time.perf_counter()
        report.intervals.append((t0, t1))
        report.train_s += t1 - t0
        report.peak_rss_bytes = max(report.peak_rss_bytes, rss.peak_bytes)
        report.tokens += count_tokens(batch)
        report.losses.append(loss)
        step = device.steps_done
        if on_step is not None:
            on_step(device_id, step, loss)
        if is_round_end(step, n_steps, every):
            report.rounds.append(device.aggregate(math.ceil(step / every), float(len(data))))
    report.steps = device.steps_done
    report.saved_activation_bytes = device.saved_bytes
    report.meter = device.transport.meter.snapshot()
    report.state = {n: p.detach().clone() for n, p in device.named.items()}
    device.transport.close()
    return report
