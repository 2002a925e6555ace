"""The device side of split training.

- `SplitDevice`: its segment (and the head when U-shaped), its own optimiser and LR
  schedule, and the exchange with the cloud over a `Transport`. It is also callable
  like the uncut model (`device(**inputs, labels=...)` -> `.loss` and `.logits`, or
  `.start_logits` / `.end_logits` for extractive QA, with `.train()` / `.eval()`), so
  evaluation runs through the same split path as training (and the task adapter's own
  evaluation).
- `ReconnectingStep`: the device's training step as a `fit` step function that survives
  a dropped link (reconnect with back-off, agree on the step count, skip the batch);
  split and splitfed devices both train through it.
- `train_device`: the whole device of a `split` run: data, steps, evaluation, result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.config import Config
from cotune.data import load_task
from cotune.data.registry import IMAGE_KINDS
from cotune.data.registry import fingerprint as data_fingerprint
from cotune.link.codecs import Codec
from cotune.link.errors import LinkClosed, ProtocolError
from cotune.link.pca import PcaProjection
from cotune.link.proto import pb
from cotune.link.transport import Transport
from cotune.link.wire import from_wire, pack_mask, to_wire
from cotune.memory import apply_memory_option, checkpointed_layers
from cotune.memory.measure import SavedTensorMeter, model_state_bytes
from cotune.methods.spec import MethodResult, TransportFactory
from cotune.methods.split.problems import PROBLEMS, Problem, problem_for
from cotune.methods.split.protocol import (
    DEVICE_STREAM,
    PROTOCOL,
    build_split,
    fingerprint,
    real_token_rows,
    trainable,
)
from cotune.models import load_tokenizer
from cotune.models.base_dtype import weight_bytes
from cotune.models.cut import DeviceSegment, SplitClassifier
from cotune.models.rng import RngStream
from cotune.privacy import CutNoise, cut_noise_for
from cotune.training import (
    Checkpoints,
    Evaluation,
    Recorder,
    adapter_for,
    autocast,
    cycle,
    fit,
    make_optimizer,
    make_schedule,
    model_inputs,
    seed_everything,
    set_threads,
    total_steps,
)

log = logging.getLogger(__name__)


@dataclass
class Sent:
    """The activations of one batch as they crossed: the rows (still attached to the
    graph when training), the padding mask and the batch shape [B, L]."""

    rows: torch.Tensor
    mask: torch.Tensor | None
    batch: int
    length: int


class SplitDevice:
    """One device: `connect`, optionally `calibrate`, then `train_step` per batch.

    Subclasses training other heads (splitfed's causal LMs) override `PROBLEMS`.
    """

    PROBLEMS: dict[str, Problem] = PROBLEMS

    def __init__(
        self,
        cfg: Config,
        split: SplitClassifier,
        codec: Codec,
        transport: Transport,
        *,
        num_labels: int,
        problem: str,
        rng: RngStream | None = None,
    ) -> None:
        self.cfg = cfg
        self.codec = codec
        self.transport = transport
        self.num_labels = num_labels
        self.problem = problem
        self.kind = self.PROBLEMS[problem]
        self.labels_on_device = split.labels == "device"
        self.segment: DeviceSegment = split.device
        self.head: nn.Module | None = split.head if self.labels_on_device else None
        self.width = split.width
        self.hidden_size = split.hidden_size
        self.modules: list[nn.Module] = [self.segment] + ([self.head] if self.head else [])
        self.named = split.named_trainable(self.modules)  # the uncut model's names
        self.params = list(self.named.values())
        self.optimizer = make_optimizer(self.params, cfg)
        self.schedule: torch.optim.lr_scheduler.LambdaLR | None = None
        self.rng = rng or RngStream(cfg.seed, DEVICE_STREAM)
        self.pca = (
            PcaProjection(split.width, codec.projection_rank)
            if codec.projection_rank is not None
            else None
        )
        self.steps_done = 0
        self.total_steps = 0
        self.training = True
        self.saved_bytes = 0  # largest saved-for-backward bytes of one step (device side)
        self.timeout = cfg.runtime.timeout_s
        # [privacy]: clip + noise every row before the codec (set once the data is known)
        self.noise: CutNoise | None = None

    def memory_state(self) -> dict[str, int]:
        """What the device holds: its segment (and head), their gradients, optimiser state."""
        return model_state_bytes(self.modules, self.optimizer)

    # -------------------------------------------------------------- connection

    def connect(self, total_steps: int, transport: Transport | None = None) -> None:
        """Say hello (first time or after a reconnect) and agree on the step count."""
        if transport is not None:
            self.transport = transport
        if self.schedule is None:
            self.total_steps = total_steps
            self.schedule = make_schedule(self.optimizer, total_steps, self.cfg.train)
        hello = pb.Hello(
            protocol=PROTOCOL,
            fingerprint=fingerprint(self.cfg),
            total_steps=total_steps,
            num_labels=self.num_labels,
            problem=self.problem,
            steps_done=self.steps_done,
        )
        self._phase("control")
        reply = self.transport.request(pb.DeviceMessage(hello=hello), self.timeout)
        if reply.WhichOneof("kind") != "welcome":
            raise ProtocolError(f"expected welcome, the cloud sent {reply.WhichOneof('kind')}")
        # A step the cloud finished but whose answer was lost counts as done on both
        # sides: the device skips its update for that batch and keeps the LR in step.
        while self.steps_done < reply.welcome.steps_done:
            self._advance_schedule()

    def calibrate(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """`pca`: fit the projection on a few batches' cut activations; send it once."""
        if self.pca is None:
            return
        rows = []
        was = self.segment.training
        self.segment.eval()
        with torch.no_grad():
            for batch in batches:
                hidden, mask = self.segment(**model_inputs(batch))
                rows.append(real_token_rows(hidden.float(), mask))
        self.segment.train(was)
        self.pca.calibrate(torch.cat(rows))
        self._phase("control")
        msg = pb.DeviceMessage(calibrate=pb.Calibrate(state=self.pca.state()))
        self.transport.request(msg, self.timeout)

    # -------------------------------------------------------------- one step

    def _phase(self, phase: str) -> None:
        self.transport.meter.phase = phase

    def _advance_schedule(self) -> None:
        assert self.schedule is not None
        self.schedule.step()
        self.steps_done += 1

    def _forward_message(
        self, batch: dict[str, torch.Tensor], train: bool
    ) -> tuple[pb.DeviceMessage, Sent]:
        """Run the device segment and build the Forward message; returns what was sent
        (the rows still attached to the graph when training)."""
        meter = SavedTensorMeter(self.params) if train else None
        with self.rng.scope(), autocast(self.cfg.train.precision):
            if meter is not None:
                with meter:
                    hidden, mask = self.segment(**model_inputs(batch))
            else:
                hidden, mask = self.segment(**model_inputs(batch))
            rows = real_token_rows(hidden, mask).float()
            if self.pca is not None:
                rows = self.pca.project(rows)
            if self.noise is not None:
                rows = self.noise(rows, train)
        if meter is not None:
            self.saved_bytes = max(self.saved_bytes, meter.peak_bytes)
        fwd = pb.Forward(
            step=self.steps_done,
            train=train or self.training,
            backward=train,
            batch_shape=list(hidden.shape[:2]),
            activations=self.codec.forward.encode(rows),
        )
        if mask is not None:
            fwd.mask.CopyFrom(pack_mask(mask))
        if not self.labels_on_device:
            fwd.labels.CopyFrom(to_wire(batch["labels"]))
        batch_size, length = hidden.shape[:2]
        return pb.DeviceMessage(forward=fwd), Sent(rows, mask, batch_size, length)

    def _cut_grad(self, result: pb.Result, rows: torch.Tensor) -> torch.Tensor:
        return self.codec.backward.decode(result.grad, "grad", rows.shape[0], rows.shape[1])

    def _head(
        self, result: pb.Result, sent: Sent, labels: torch.Tensor, grad: bool
    ) -> tuple[torch.Tensor, Any]:
        """U-shaped: the head on the cloud's output; returns the rows that came down
        (a leaf whose gradient goes back up) and the head's output."""
        assert self.head is not None
        n = self.kind.n_rows(sent.mask, sent.batch, sent.length)
        top = self.codec.top_forward.decode(result.output, "output", n, self.hidden_size)
        top.requires_grad_(grad)
        with self.rng.scope(), autocast(self.cfg.train.precision):
            features = self.kind.unrows(top, sent.mask, sent.batch, sent.length)
            out = self.head(features, labels, sent.mask)
        return top, out

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on both sides; returns the loss."""
        self.train(True)
        self._phase("train")
        msg, sent = self._forward_message(batch, train=True)
        rows = sent.rows
        reply = self.transport.request(msg, self.timeout).result
        if self.labels_on_device:
            top, out = self._head(reply, sent, batch["labels"], grad=True)
            out.loss.backward()
            assert top.grad is not None
            back = pb.Backward(step=self.steps_done, grad=self.codec.top_backward.encode(top.grad))
            reply = self.transport.request(pb.DeviceMessage(backward=back), self.timeout).result
            loss = float(out.loss.detach())
        else:
            loss = float(reply.loss)
        grad = self._cut_grad(reply, rows)
        if checkpointed_layers(self.segment):
            # backward recomputes the checkpointed layers, and torch puts the RNG state
            # of their forward back meanwhile (dropout): hold the process-wide RNG lock
            # as the forward did, so a device in another thread draws nothing meanwhile
            # (the stream itself is left as it was: the recomputation restores it)
            with self.rng.scope():
                rows.backward(grad)
        else:
            rows.backward(grad)
        if self.cfg.train.max_grad_norm:  # 0: no clipping
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._advance_schedule()
        return loss

    # -------------------------------------------------------------- as a model

    def train(self, mode: bool = True) -> SplitDevice:
        self.training = mode
        for m in self.modules:
            m.train(mode)
        return self

    def eval(self) -> SplitDevice:
        return self.train(False)

    def __call__(self, labels: torch.Tensor, **inputs: torch.Tensor) -> Any:
        """Evaluation forward through the split path (no gradients, eval mode on both
        sides unless `train()` was called): the uncut model's output (`.loss` and
        `.logits`, or `.start_logits` / `.end_logits` for a span head; per-token logits
        are zero at padding)."""
        batch = {**inputs, "labels": labels}
        self._phase("eval")
        with torch.no_grad():
            msg, sent = self._forward_message(batch, train=False)
            reply = self.transport.request(msg, self.timeout).result
            if self.labels_on_device:
                _, out = self._head(reply, sent, labels, grad=False)
                return self.kind.output(out.loss, self.kind.logits(out))
            n = self.kind.n_rows(sent.mask, sent.batch, sent.length)
            rows = from_wire(
                reply.logits, "logits", dtypes=("float32",), shape=(n, self.num_labels)
            )
            logits = self.kind.unrows(rows, sent.mask, sent.batch, sent.length)
            return self.kind.output(torch.tensor(reply.loss), logits)


class ReconnectingStep:
    """`device.train_step` as a `fit` step that survives a dropped link.

    On `LinkClosed` it reconnects through `connect()` (back-off 0.2 s, 0.4 s, ... at most
    3 s; at most `runtime.reconnect` times, then the error propagates), says hello
    again so both sides agree on the steps done (a step the cloud finished whose answer
    was lost counts as done), and returns None: the batch is skipped.
    """

    def __init__(self, device: SplitDevice, connect: TransportFactory, n_steps: int) -> None:
        self.device = device
        self.connect = connect
        self.n_steps = n_steps
        self.reconnects = 0

    @property
    def saved_bytes(self) -> int:
        return self.device.saved_bytes

    @property
    def params(self) -> list[nn.Parameter]:
        return self.device.params

    def memory_state(self) -> dict[str, int]:
        return self.device.memory_state()

    def __call__(self, batch: dict[str, torch.Tensor]) -> float | None:
        try:
            return self.device.train_step(batch)
        except LinkClosed as err:
            self.reconnects += 1
            limit = self.device.cfg.runtime.reconnect
            if self.reconnects > limit:
                raise
            log.warning("link dropped (%s); reconnecting (%d/%d)", err, self.reconnects, limit)
            self.device.optimizer.zero_grad(set_to_none=True)
            time.sleep(min(2.0**self.reconnects, 30.0) * 0.1)
            self.device.connect(self.n_steps, self.connect())
            return None


def train_device(
    cfg: Config,
    device_id: int,
    connect: TransportFactory,
    recorder: Recorder,
    run_dir: Path | None = None,
    *,
    rng: RngStream | None = None,
) -> MethodResult:
    """Train as the (only) device of a split run against the cloud `connect()` reaches:
    the device owns the data and the labels, sends each batch's activations, steps its
    own optimiser, evaluates through the split path every `train.eval_every` steps, and
    reports bytes as its transport counted them."""
    seed_everything(cfg.seed)
    set_threads(cfg.train)
    task = load_task(cfg.task, cfg.seed)
    adapter = adapter_for(task, cfg)
    tokenizer = load_tokenizer(cfg.model.name)
    # the head the cut model trains (an image classifier is a classifier; QA a span head)
    problem, num_labels = problem_for(task.kind, task.num_labels)
    split, codec = build_split(cfg, num_labels, problem, party="device")
    trainable_cloud = sum(p.numel() for p in trainable(split.cloud_modules()))
    apply_memory_option(split.device, cfg.memory, seed=cfg.seed)  # before the optimiser
    device = SplitDevice(
        cfg, split, codec, connect(), num_labels=num_labels, problem=problem, rng=rng
    )
    del split  # the device keeps its own segment (and the head when U-shaped) only
    train_ds = adapter.encode(task.train, tokenizer)
    loader = adapter.loader(train_ds, tokenizer, shuffle=True, seed=cfg.seed)
    n_steps = total_steps(cfg.train, len(loader))
    device.noise = cut_noise_for(cfg, n_examples=len(train_ds), steps=n_steps,
                                 image_task=task.kind in IMAGE_KINDS)  # fmt: skip
    device.connect(n_steps)
    if codec.projection_rank is not None:
        # A loader of its own (same seed): calibration does not shift the training order.
        cal = adapter.loader(train_ds, tokenizer, shuffle=True, seed=cfg.seed)
        device.calibrate(
            [b for _, b in zip(range(cfg.link.calibration_batches), cal, strict=False)]
        )
    step = ReconnectingStep(device, connect, n_steps)
    network = device.transport.network  # the emulated link, shared by reconnections
    last: list[Evaluation] = []  # the latest evaluation (the final one after `fit`)

    def evaluate() -> dict[str, float]:
        if device.noise is not None:
            device.noise.eval_passes += 1
        last[:] = [adapter.evaluate(device, tokenizer)]
        if device.noise is not None:  # what crossing so far has spent
            last[0].metrics.update(device.noise.metrics())
        return last[0].metrics

    checkpoints = Checkpoints(
        recorder, n_steps, cfg.train.eval_every,
        evaluate=evaluate,
        lr=lambda: device.optimizer.param_groups[0]["lr"],
        traffic=lambda: (device.transport.meter.up, device.transport.meter.down),
        network=lambda: network.offset_s() if network is not None else 0.0,
    )  # fmt: skip
    stats = fit(step, cycle(loader), n_steps, position=lambda: device.steps_done,
                breakdown_memory=cfg.memory.report,
                on_step=checkpoints, progress=f"split {task.name}")  # fmt: skip
    meter: dict[str, Any] = device.transport.meter.snapshot()
    device.transport.close()
    state = {n: p.detach().contiguous() for n, p in device.named.items()}
    return MethodResult(
        metrics=dict(checkpoints.last),
        bytes_up=int(meter["bytes_up"]),
        bytes_down=int(meter["bytes_down"]),
        device_peak_bytes=stats.peak_rss_bytes,
        saved_activation_bytes=device.saved_bytes,
        trainable_device=sum(p.numel() for p in device.params),
        trainable_cloud=trainable_cloud,
        extra={
            **stats.summary(),
            "device_weight_bytes": weight_bytes(*device.modules),
            # what it trained on: its examples and their fingerprint (data.registry)
            "train_data": {
                "source": task.source,
                "examples": len(task.train),
                "sha256": data_fingerprint(task.train, task),
            },  # fmt: skip
            "steps": device.steps_done,
            "step_s_median": float(torch.tensor(stats.step_times).median())
            if stats.step_times
            else None,
            **(
                {
                    "privacy": {
                        **device.noise.budget.summary(),
                        **device.noise.metrics(),
                        "labels_cross": cfg.split.labels == "cloud",
                    }
                }
                if device.noise is not None
                else {}
            ),  # fmt: skip
            **({"network": network.snapshot()} if network is not None else {}),
            "link": {
                "codec": cfg.link.codec,
                "transport": cfg.runtime.transport,
                "cut": cfg.split.cut,
                "labels": cfg.split.labels,
                "width": device.width,
                "reconnects": step.reconnects,
                **meter,
            },
        },
        saved={"device_trainable.safetensors": state},
        predictions=last[0].predictions if last else [],
    )
