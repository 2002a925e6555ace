"""One splitfed device: its share of the data, its segment + LoRA, its own optimiser and
LR schedule, the split exchange per step, and adapter averaging every
`federated.aggregate_every` steps (and after the last step)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from cotune.config import Config
from cotune.data.registry import fingerprint
from cotune.link.errors import MalformedMessage, ProtocolError
from cotune.link.proto import pb
from cotune.link.wire import from_wire, to_wire
from cotune.memory import apply_memory_option
from cotune.methods.federated.data import client_examples, client_task
from cotune.methods.spec import MethodResult, TransportFactory
from cotune.methods.split.device import ReconnectingStep, SplitDevice
from cotune.methods.split.protocol import DEVICE_STREAM
from cotune.methods.splitfed.cloud import PROBLEM, LMCloud, build_lm_split
from cotune.models.base_dtype import weight_bytes
from cotune.models.rng import RngStream
from cotune.privacy import cut_noise_for
from cotune.training import (
    Recorder,
    StepStats,
    adapter_for,
    cycle,
    derive_seed,
    fit,
    total_steps,
)


class LMDevice(SplitDevice):
    """`SplitDevice` for a causal LM, plus adapter averaging with the cloud."""

    PROBLEMS = LMCloud.PROBLEMS

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


def device_steps(cfg: Config, n_train: int) -> int:
    """Steps every device takes (the same on all, so averaging rounds line up)."""
    per_device = math.ceil(n_train / cfg.federated.clients)
    return total_steps(cfg.train, max(1, math.ceil(per_device / cfg.train.batch_size)))


def is_round_end(step: int, n_steps: int, every: int) -> bool:
    return step % every == 0 or step == n_steps


def train_device(
    cfg: Config,
    device_id: int,
    connect: TransportFactory,
    recorder: Recorder,
    run_dir: Path | None = None,
) -> MethodResult:
    """Train as device `device_id` (its partition of the training data, or all of its
    own with `federated.client_data = "node"`) to the end.

    Every step's loss goes to `recorder` (`{"step", "device", "loss"}`); the result's
    `extra` holds what the device did (examples, steps, averaging rounds, step
    intervals, bytes by phase), and `saved` its trained adapter."""
    task = client_task(cfg)
    adapter = adapter_for(task, cfg)
    examples = client_examples(cfg, device_id)
    split, codec, model, tokenizer = build_lm_split(cfg, party="device")
    vocab = int(model.lm.get_output_embeddings().out_features)  # nn.Linear or FrozenLinear
    device = LMDevice(
        cfg, split, codec, connect(), num_labels=vocab, problem=PROBLEM,
        rng=RngStream(cfg.seed + device_id, DEVICE_STREAM),
    )  # fmt: skip
    del split, model  # the device keeps its segment only
    apply_memory_option(device.segment, cfg.memory)
    data = adapter.encode(examples, tokenizer)
    seed = derive_seed(cfg.seed, "splitfed-device", device_id)
    loader = adapter.loader(data, tokenizer, shuffle=True, seed=seed)
    n_steps = device_steps(cfg, len(task.train))
    device.noise = cut_noise_for(cfg, n_examples=len(data), steps=n_steps)
    device.connect(n_steps)
    if codec.projection_rank is not None:
        cal = adapter.loader(data, tokenizer, shuffle=True, seed=seed)
        device.calibrate(
            [b for _, b in zip(range(cfg.link.calibration_batches), cal, strict=False)]
        )
    every = cfg.federated.aggregate_every
    rounds: list[int] = []  # participants per averaging round
    intervals: list[tuple[float, float]] = []  # perf_counter spans of the steps

    def on_step(step: int, loss: float, stats: StepStats) -> None:
        end = time.perf_counter()
        intervals.append((end - stats.step_times[-1], end))
        recorder.log_train({"step": step, "device": device_id, "loss": loss})
        if is_round_end(step, n_steps, every):
            rounds.append(device.aggregate(math.ceil(step / every), float(len(data))))

    step = ReconnectingStep(device, connect, n_steps)
    stats = fit(step, cycle(loader), n_steps, position=lambda: device.steps_done,
                on_step=on_step, breakdown_memory=cfg.memory.report)  # fmt: skip
    meter: dict[str, Any] = device.transport.meter.snapshot()
    network = device.transport.network  # `[link.network]`'s emulated link, if any
    device.transport.close()
    state = {n: p.detach().clone().contiguous() for n, p in device.named.items()}
    loss = stats.recent_loss()
    return MethodResult(
        metrics={"loss": loss},
        bytes_up=int(meter["bytes_up"]),
        bytes_down=int(meter["bytes_down"]),
        device_peak_bytes=stats.peak_rss_bytes,
        saved_activation_bytes=device.saved_bytes,
        trainable_device=sum(p.numel() for p in device.params),
        trainable_cloud=0,  # the cloud reports its own
        extra={
            **({"memory_breakdown": stats.memory.as_dict()} if stats.memory else {}),
            "device": device_id,
            "device_weight_bytes": weight_bytes(*device.modules),
            "examples": len(data),
            "train_sha256": fingerprint(examples, task),
            "steps": device.steps_done,
            "rounds": rounds,
            "train_s": stats.train_s,
            "tokens_per_s": stats.tokens_per_s,
            "intervals": intervals,
            "reconnects": step.reconnects,
            "recent_losses": stats.losses[-10:],
            "meter": meter,
            **({"network": network.snapshot()} if network is not None else {}),
        },
        saved={"device_trainable.safetensors": state},
    )
