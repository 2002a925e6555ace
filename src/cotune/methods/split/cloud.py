"""The cloud side of split training: a `cotune.link.service.Service`.

`SplitCloud` holds the cloud segment (and the head unless U-shaped), its own optimiser
and the same LR schedule as the device. It is built at the first device's `Hello`
(which brings the label count and the schedule length: the cloud has no data). Each
device stream gets a `SplitSession`; per-device state (steps done, RNG stream, PCA
basis) outlives the stream, so a device that drops can reconnect and carry on.

Every message is validated before anything touches the model: a malformed one gets an
error answer and changes nothing. The optimiser step runs as the answer's follow-up,
i.e. after the gradient is on its way to the device; the gradients of a step are moved
aside under the model lock, so devices sharing the cloud never mix gradients.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from cotune.config import Config
from cotune.link.codecs import Codec, make_codec
from cotune.link.errors import MalformedMessage, ProtocolError
from cotune.link.pca import PcaProjection
from cotune.link.proto import pb
from cotune.link.service import After
from cotune.link.wire import to_wire, unpack_mask
from cotune.methods.split.problems import PROBLEMS, Problem
from cotune.methods.split.protocol import (
    CLOUD_STREAM,
    PROTOCOL,
    build_split,
    fingerprint,
    scatter_rows,
)
from cotune.models.cut import CloudSegment
from cotune.models.rng import RngStream
from cotune.training import autocast, make_optimizer, make_schedule
from cotune.training.placement import cloud_device, place

log = logging.getLogger(__name__)

MAX_BATCH = 1 << 16
MAX_LENGTH = 1 << 16


@dataclass
class _DeviceState:
    """What the cloud remembers about one device across its streams."""

    rng: RngStream
    steps_done: int = 0
    epoch: int = 0  # bumped by every Hello: follow-ups of an older stream are dropped
    pca: PcaProjection | None = None
    pending: dict[str, Any] | None = None  # U-shaped: the graph waiting for Backward
    lock: threading.Lock = field(default_factory=threading.Lock)


class SplitCloud:
    """The cloud of a split run; serves one or more devices (sharing one model).

    Subclasses serving other model kinds (splitfed's causal LMs) override `PROBLEMS`
    (the heads it trains, by `Hello.problem`) and `make_split`.
    """

    PROBLEMS: dict[str, Problem] = PROBLEMS

    def __init__(self, cfg: Config, rng: RngStream | None = None) -> None:
        self.cfg = cfg
        self.codec: Codec = make_codec(cfg.link)
        self.compute = cloud_device(cfg.runtime.device)  # where the cloud segment runs
        self.fingerprint = fingerprint(cfg)
        self.labels_on_cloud = cfg.split.labels == "cloud"
        self._model_lock = threading.Lock()
        self._states_lock = threading.Lock()
        self._states: dict[int, _DeviceState] = {}
        self._shared_rng = rng  # tests: one stream shared with the device
        self.built = False
        self.segment: CloudSegment | None = None
        self.head: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: torch.optim.lr_scheduler.LambdaLR | None = None
        self.total_steps = 0
        self.num_labels = 0
        self.problem = ""
        self.kind: Problem = Problem()  # PROBLEMS[problem] once built
        self.width = 0
        self.hidden_size = 0
        self.max_length = MAX_LENGTH
        self.steps = 0  # optimiser steps taken (all devices)

    # ------------------------------------------------------------------ setup

    def make_split(self, num_labels: int, problem: str) -> Any:
        """The cut model (built from the seed like the device's)."""
        return build_split(self.cfg, num_labels, problem)[0]

    def build(self, num_labels: int, problem: str, total_steps: int) -> None:
        split = self.make_split(num_labels, problem)
        self.segment = place(split.cloud, self.compute)
        self.head = place(split.head, self.compute) if self.labels_on_cloud else None
        self.width = split.width
        self.hidden_size = split.hidden_size
        self.max_length = int(
            getattr(split.cloud.config, "max_position_embeddings", None) or MAX_LENGTH
        )
        modules = [self.segment] + ([self.head] if self.head is not None else [])
        self.named = split.named_trainable(modules)  # the uncut model's names
        self.params = list(self.named.values())
        self.modules = modules
        self.optimizer = make_optimizer(self.params, self.cfg)
        self.schedule = make_schedule(self.optimizer, total_steps, self.cfg.train)
        self.total_steps = total_steps
        self.num_labels = num_labels
        self.problem = problem
        self.kind = self.PROBLEMS[problem]
        self.built = True

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params) if self.built else 0

    def state(self, device_id: int) -> _DeviceState:
        with self._states_lock:
            if device_id not in self._states:
                rng = self._shared_rng or RngStream(self.cfg.seed + device_id, CLOUD_STREAM)
                self._states[device_id] = _DeviceState(rng=rng)
            return self._states[device_id]

    def open_session(self, device_id: int) -> SplitSession:
        return SplitSession(self, device_id)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The cloud's trainable tensors under the uncut model's names (for saving)."""
        if not self.built:
            return {}
        return {n: p.detach().cpu().contiguous() for n, p in self.named.items()}

    # ------------------------------------------------------------------ steps

    def _step(
        self, grads: list[torch.Tensor | None], state: _DeviceState, epoch: int | None = None
    ) -> None:
        """Apply one step's gradients (moved aside earlier) with clipping, then LR step.

        Skipped when the device has said hello again since (`epoch` changed): its old
        stream is gone and the reconnect already agreed on the step count.
        """
        assert self.optimizer is not None and self.schedule is not None
        with state.lock:
            if epoch is not None and epoch != state.epoch:
                log.info("dropping the follow-up of a replaced stream")
                return
            with self._model_lock:
                for p, g in zip(self.params, grads, strict=True):
                    p.grad = g
                if self.cfg.train.max_grad_norm:  # 0: no clipping
                    torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.schedule.step()
                self.steps += 1
            state.steps_done += 1

    def _take_grads(self) -> list[torch.Tensor | None]:
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def skip_to(self, state: _DeviceState, steps_done: int) -> None:
        """The device finished steps whose follow-up never ran here: advance the LR."""
        assert self.schedule is not None
        while state.steps_done < steps_done:
            with self._model_lock:
                self.schedule.step()
            state.steps_done += 1


class SplitSession:
    """One device stream: validates and answers Hello, Calibrate, Forward, Backward."""

    def __init__(self, cloud: SplitCloud, device_id: int) -> None:
        self.cloud = cloud
        self.device_id = device_id
        self.state = cloud.state(device_id)
        self.greeted = False

    def close(self) -> None:
        self.state.pending = None  # a half-done U-shaped step is dropped

    def handle(self, msg: pb.DeviceMessage) -> tuple[pb.CloudMessage, After]:
        kind = msg.WhichOneof("kind")
        if kind == "hello":
            return self._hello(msg.hello), None
        if not self.greeted:
            raise ProtocolError(f"the first message must be hello, not {kind}")
        if kind == "calibrate":
            return self._calibrate(msg.calibrate), None
        if kind == "forward":
            return self._forward(msg.forward)
        if kind == "backward":
            return self._backward(msg.backward)
        raise MalformedMessage("empty device message")

    # ------------------------------------------------------------------ hello

    def _hello(self, hello: pb.Hello) -> pb.CloudMessage:
        c = self.cloud
        if hello.protocol != PROTOCOL:
            raise ProtocolError(f"protocol {hello.protocol!r}; this cloud speaks {PROTOCOL!r}")
        if hello.fingerprint != c.fingerprint:
            raise ProtocolError(
                "the device's config differs from the cloud's (seed, model, split, link or "
                "train settings); start both with the same config file"
            )
        if hello.problem not in c.PROBLEMS:
            raise MalformedMessage(f"hello.problem {hello.problem!r} is not valid")
        if not 1 <= hello.num_labels <= 1 << 20 or hello.total_steps < 1:
            raise MalformedMessage("hello: num_labels and total_steps must be positive")
        outputs = c.PROBLEMS[hello.problem].outputs
        if outputs is not None and hello.num_labels != outputs:
            raise MalformedMessage(
                f"hello: a {hello.problem} head has {outputs} outputs, not {hello.num_labels}"
            )
        with c._model_lock:
            if not c.built:
                c.build(hello.num_labels, hello.problem, hello.total_steps)
        if (hello.num_labels, hello.problem, hello.total_steps) != (
            c.num_labels, c.problem, c.total_steps,
        ):  # fmt: skip
            raise ProtocolError(
                f"this cloud trains {c.num_labels} labels ({c.problem}) for {c.total_steps} "
                f"steps; the device asked for {hello.num_labels} ({hello.problem}) for "
                f"{hello.total_steps}"
            )
        with self.state.lock:
            self.state.epoch += 1
            if hello.steps_done > self.state.steps_done:
                c.skip_to(self.state, hello.steps_done)
            self.state.pending = None
            done = self.state.steps_done
        self.greeted = True
        log.info("device %s connected at step %s", self.device_id, done)
        return pb.CloudMessage(welcome=pb.Welcome(steps_done=done))

    def _calibrate(self, cal: pb.Calibrate) -> pb.CloudMessage:
        c = self.cloud
        rank = c.codec.projection_rank
        if rank is None:
            raise ProtocolError(f"codec {c.codec.name!r} takes no calibration")
        pca = PcaProjection(c.width, rank)
        pca.load_state(cal.state)
        self.state.pca = pca
        return pb.CloudMessage(ack=pb.Ack())

    # ------------------------------------------------------------------ forward

    def _inputs(self, fwd: pb.Forward) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """Validated (rows, mask, B, L) of a Forward message."""
        c = self.cloud
        if len(fwd.batch_shape) != 2:
            raise MalformedMessage(f"forward.batch_shape {list(fwd.batch_shape)} is not [B, L]")
        b, length = fwd.batch_shape
        if not (1 <= b <= MAX_BATCH and 1 <= length <= c.max_length):
            raise MalformedMessage(
                f"forward.batch_shape {[b, length]} is outside [1..{MAX_BATCH}, 1..{c.max_length}]"
            )
        mask = None
        rows_n = b * length
        if fwd.HasField("mask"):
            mask = unpack_mask(fwd.mask, "forward.mask", (b, length))
            if not bool(mask.any(dim=1).all()):
                raise MalformedMessage("forward.mask: a row has no real token")
            rows_n = int(mask.sum())
        width = c.codec.projection_rank or c.width
        if c.codec.projection_rank is not None and self.state.pca is None:
            raise ProtocolError("codec 'pca' needs the device's calibration first")
        rows = c.codec.forward.decode(fwd.activations, "forward.activations", rows_n, width)
        return rows, mask, b, length

    def _labels(
        self, fwd: pb.Forward, mask: torch.Tensor | None, b: int, length: int
    ) -> torch.Tensor:
        c = self.cloud
        if not fwd.HasField("labels"):
            raise MalformedMessage("forward.labels: missing (the loss lives on the cloud)")
        return c.kind.labels(fwd.labels, mask, b, length, c.num_labels)

    def _forward(self, fwd: pb.Forward) -> tuple[pb.CloudMessage, After]:
        c = self.cloud
        assert c.segment is not None
        rows, mask, b, length = self._inputs(fwd)
        labels = self._labels(fwd, mask, b, length) if c.labels_on_cloud else None
        if not c.labels_on_cloud and fwd.HasField("labels"):
            raise MalformedMessage("forward.labels: labels stay on the device (U-shaped)")
        train = fwd.backward  # a training step; fwd.train alone is a forward in train mode
        with self.state.lock:
            if train and fwd.step != self.state.steps_done:
                raise ProtocolError(
                    f"forward for step {fwd.step}; the cloud expects step {self.state.steps_done}"
                )
            self.state.pending = None
            epoch = self.state.epoch
        # the rows arrive on the CPU (the leaf whose gradient crosses back); the segment
        # reads them on its device (`.to` is a no-op on the CPU path)
        dev = c.compute
        mask_long = None if mask is None else mask.long().to(dev)
        mask_dev = None if mask is None else mask.to(dev)
        labels = None if labels is None else labels.to(dev)
        leaf = rows.requires_grad_(train)
        with c._model_lock:
            for m in c.modules:
                m.train(fwd.train or train)
            grad_ctx = torch.enable_grad() if train else torch.no_grad()
            with grad_ctx, self.state.rng.scope(), autocast(c.cfg.train.precision, dev.type):
                crossing = self.state.pca.reconstruct(leaf) if self.state.pca else leaf
                hidden = scatter_rows(crossing, mask, b, length).to(dev)
                features = c.segment(hidden, mask_long)
                out = c.head(features, labels, mask_long) if c.head is not None else None
            result = pb.Result(step=fwd.step)
            if out is not None:
                result.loss = float(out.loss.detach())
            if not train:
                if out is not None:
                    logits = c.kind.rows(c.kind.logits(out).detach().float(), mask_dev)
                    result.logits.CopyFrom(to_wire(logits))
                else:
                    top = c.kind.rows(features.detach().float(), mask_dev)
                    result.output.CopyFrom(c.codec.top_forward.encode(top.cpu()))
                return pb.CloudMessage(result=result), None
            if out is None:  # U-shaped: wait for the head's gradient
                top = c.kind.rows(features, mask_dev)  # pooled features, or real tokens' rows
                self.state.pending = {"step": fwd.step, "leaf": leaf, "top": top}
                result.output.CopyFrom(c.codec.top_forward.encode(top.detach().float().cpu()))
                return pb.CloudMessage(result=result), None
            for p in c.params:
                p.grad = None
            out.loss.backward()
            grads = c._take_grads()
        assert leaf.grad is not None
        result.grad.CopyFrom(c.codec.backward.encode(leaf.grad))
        return pb.CloudMessage(result=result), lambda: c._step(grads, self.state, epoch)

    def _backward(self, back: pb.Backward) -> tuple[pb.CloudMessage, After]:
        c = self.cloud
        if c.labels_on_cloud:
            raise ProtocolError("backward messages are for U-shaped training (labels on device)")
        pending = self.state.pending
        epoch = self.state.epoch
        if pending is None or pending["step"] != back.step:
            raise ProtocolError(f"backward for step {back.step} without its forward")
        top, leaf = pending["top"], pending["leaf"]
        grad = c.codec.top_backward.decode(back.grad, "backward.grad", top.shape[0], top.shape[1])
        with c._model_lock:
            for p in c.params:
                p.grad = None
            top.backward(grad.to(top.device, top.dtype))
            grads = c._take_grads()
        self.state.pending = None
        result = pb.Result(step=back.step)
        result.grad.CopyFrom(c.codec.backward.encode(leaf.grad))
        return pb.CloudMessage(result=result), lambda: c._step(grads, self.state, epoch)
