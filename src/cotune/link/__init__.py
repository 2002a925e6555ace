"""cotune.link: what crosses the cut between a device and the cloud, and how.

- `codecs`: wire formats (fp32, fp16, bf16, int8 per-token, top-k) and `make_codec`;
  `pca` (calibrated projection); the `sft` bottleneck lives in `cotune.models.cut`.
- `wire`: tensors <-> protobuf with strict validation; `proto`: the wire protocol.
- `transport` (in-process) and `grpc_transport` (gRPC): device-side streams;
  `service.CloudEndpoint`: the cloud side behind per-device tokens (`auth`).
- `accounting.ByteMeter`: the only place bytes on the wire are counted.
"""

from cotune.link.accounting import ByteMeter
from cotune.link.codecs import Codec, make_codec
from cotune.link.errors import (
    AuthError,
    LinkClosed,
    LinkError,
    MalformedMessage,
    ProtocolError,
    RemoteError,
    TooLarge,
)
from cotune.link.service import CloudEndpoint, Service, Session
from cotune.link.transport import InProcessTransport, Transport

__all__ = [
    "AuthError",
    "ByteMeter",
    "CloudEndpoint",
    "Codec",
    "InProcessTransport",
    "LinkClosed",
    "LinkError",
    "MalformedMessage",
    "ProtocolError",
    "RemoteError",
    "Service",
    "Session",
    "TooLarge",
    "Transport",
    "make_codec",
]
