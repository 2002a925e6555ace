"""The device's training loop for split training: data, steps, evaluation, reconnects.

The device drives: it owns the data and the labels, sends each batch's activations,
steps its own optimiser, evaluates through the split path every `train.eval_every`
steps, and reports bytes as its transport counted them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cotune.config import Config
from cotune.data import encode, load_task, make_loader
from cotune.link.errors import LinkClosed
from cotune.link.transport import Transport
from cotune.memory import apply_memory_option
from cotune.memory.measure import PeakRSS
from cotune.methods.result import MethodResult, Recorder
from cotune.methods.split.common import build_split, trainable
from cotune.methods.split.device import SplitDevice
from cotune.methods.training import (
    count_tokens,
    cycle,
    evaluate,
    seed_everything,
    set_threads,
    total_steps,
)
from cotune.models import load_tokenizer

log = logging.getLogger(__name__)

TransportFactory = Callable[[], Transport]


def _eval_loaders(task: Any, tokenizer: Any, cfg: Config) -> dict[str, Any]:
    from cotune.methods.centralized import eval_loaders

    return eval_loaders(task, tokenizer, cfg)


def train_device(
    cfg: Config,
    recorder: Recorder,
    connect: TransportFactory,
    run_dir: Any = None,
    *,
    rng: Any = None,
) -> MethodResult:
    """Train as the device of a split run against the cloud `connect()` reaches."""
    seed_everything(cfg.seed)
    set_threads(cfg.train)
    task = load_task(cfg.task, cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    split, codec = build_split(cfg, task.num_labels, task.kind)
    trainable_cloud = sum(p.numel() for p in trainable(split.cloud_modules()))
    apply_memory_option(split.device, cfg.memory, seed=cfg.seed)  # before the optimiser
    device = SplitDevice(
        cfg, split, codec, connect(), num_labels=task.num_labels, problem=task.kind, rng=rng
    )
    del split  # the device keeps its own segment (and the head when U-shaped) only
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    train_ds = encode(task.train, tokenizer, cfg.train.max_seq_len)
    train_loader = make_loader(
        train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, pad_token_id=pad
    )
    evals = _eval_loaders(task, tokenizer, cfg)
    n_steps = total_steps(cfg.train, len(train_loader))
    device.connect(n_steps)
    if codec.projection_rank is not None:
        # A loader of its own (same seed): calibration does not shift the training order.
        cal = make_loader(
            train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, pad_token_id=pad
        )
        batches = []
        for batch in cal:
            batches.append(batch)
            if len(batches) >= cfg.link.calibration_batches:
                break
        device.calibrate(batches)

    eval_every = cfg.train.eval_every or n_steps
    batches_iter = cycle(train_loader)
    t_start = time.perf_counter()
    last: dict[str, float] = {}
    losses: list[float] = []
    since_eval: list[float] = []
    train_s = 0.0
    tokens = 0
    peak = 0
    reconnects = 0
    step_times: list[float] = []
    bar = tqdm(total=n_steps, desc=f"split {task.name}", unit="step", disable=None, leave=False)
    while device.steps_done < n_steps:
        batch = next(batches_iter)
        t0 = time.perf_counter()
        try:
            with PeakRSS() as rss:
                loss = device.train_step(batch)
        except LinkClosed as err:
            reconnects += 1
            if reconnects > cfg.runtime.reconnect:
                raise
            log.warning(
                "link dropped (%s); reconnecting (%d/%d)", err, reconnects, cfg.runtime.reconnect
            )
            device.optimizer.zero_grad(set_to_none=True)
            time.sleep(min(2.0**reconnects, 30.0) * 0.1)
            device.connect(n_steps, connect())
            continue
        dt = time.perf_counter() - t0
        step_times.append(dt)
        train_s += dt
        peak = max(peak, rss.peak_bytes)
        tokens += count_tokens(batch)
        losses.append(loss)
        since_eval.append(loss)
        step = device.steps_done
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % 10 == 0 or step == n_steps:
            recorder.log_train(
                {
                    "step": step,
                    "loss": sum(losses[-10:]) / len(losses[-10:]),
                    "lr": device.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": tokens / max(train_s, 1e-9),
                    "bytes_up": device.transport.meter.up,
                    "bytes_down": device.transport.meter.down,
                }
            )
        if step % eval_every == 0 or step == n_steps:
            result = evaluate(device, task, evals, cfg.train.precision)
            last.clear()
            last.update(result.metrics, loss=result.loss)
            meter = device.transport.meter
            recorder.log_eval(
                {
                    "step": step,
                    **result.metrics,
                    "loss": result.loss,
                    "train_loss": sum(since_eval) / max(len(since_eval), 1),
                    "bytes_up": meter.up,
                    "bytes_down": meter.down,
                    "wall_s": time.perf_counter() - t_start,
                }
            )
            since_eval.clear()
    bar.close()
    meter = device.transport.meter.snapshot()
    device.transport.close()
    if run_dir is not None:
        state = {n: p.detach().contiguous() for n, p in device.named.items()}
        save_file(state, str(run_dir / "device_trainable.safetensors"))
    return MethodResult(
        metrics=dict(last),
        bytes_up=int(meter["bytes_up"]),  # type: ignore[call-overload]
        bytes_down=int(meter["bytes_down"]),  # type: ignore[call-overload]
        device_peak_bytes=peak,
        saved_activation_bytes=device.saved_bytes,
        trainable_device=sum(p.numel() for p in device.params),
        trainable_cloud=trainable_cloud,
        extra={
            "steps": device.steps_done,
            "train_s": train_s,
            "step_s_median": float(torch.tensor(step_times).median()) if step_times else None,
            "tokens_per_s": tokens / max(train_s, 1e-9),
            "final_train_loss": sum(losses) / max(len(losses), 1),
            "link": {
                "codec": cfg.link.codec,
                "transport": cfg.runtime.transport,
                "cut": cfg.split.cut,
                "labels": cfg.split.labels,
                "width": device.width,
                "reconnects": reconnects,
                **meter,
            },
        },
    )
