"""`split`: split fine-tuning with a compressed cut (SFT).

One device and one cloud train one model cut at `split.cut`: the device runs the
embeddings and the first layers (and the head with `split.labels = "device"`), the
cloud the rest; activations go up, gradients come down, encoded by `link.codec` (any
codec; `sft` factorises the cut layer so only r-dimensional codes cross). The head is
a classifier's (classification, regression, images) or a span extractor's (extractive
QA: start / end logits per token; labels are the answer's token positions).

Read in this order:
- `protocol.py`: what both sides agree on (fingerprint, the cut model, the codec, how
  real tokens' rows go on the wire);
- `problems.py`: what differs by head (label checks, what crosses above the cut, the
  output evaluation reads);
- `device.py`: `SplitDevice` (one step: forward, send, receive the gradient, backward,
  step), `ReconnectingStep` and `train_device` (the device's whole run through `fit`);
- `cloud.py`: `SplitCloud` (the link service: validates every message, runs the rest of
  the model, steps after answering) and `SplitSession` (one device stream).

The runtime runs the spec: in process (`runtime.transport = "inprocess"`, the same
serialization and byte accounting as gRPC), against a `cotune cloud` it starts on
loopback, or as a device of a cloud at `runtime.cloud` (`cotune device`).
"""

from __future__ import annotations

from cotune.config import Config
from cotune.methods.spec import MethodSpec, SplitSpec, reject_task_kind, require_model_family
from cotune.methods.split.cloud import SplitCloud, SplitSession
from cotune.methods.split.device import ReconnectingStep, SplitDevice, train_device
from cotune.methods.split.protocol import build_split, fingerprint
from cotune.models.cut import FAMILY_OPS


def configure(cfg: Config) -> None:
    # the cut model ends in a classifier head (pooled) or a span head (per token)
    reject_task_kind(cfg, ("generation",), "splitfed for generation tasks")
    require_model_family(
        cfg, tuple(FAMILY_OPS), "split (cutting the model between device and cloud)"
    )


SPEC = MethodSpec(
    name="split",
    summary="device runs the layers before the cut, the cloud the rest; any link codec",
    runs=SplitSpec(cloud=SplitCloud, device=train_device),
    reads=frozenset({"split", "link", "memory", "runtime", "privacy"}),
    configure=configure,
)

__all__ = [
    "SPEC",
    "ReconnectingStep",
    "SplitCloud",
    "SplitDevice",
    "SplitSession",
    "build_split",
    "fingerprint",
    "train_device",
]
