"""The ClientApp's mods for protected rounds, around Flower's own (import-light: no
torch; a SuperNode loads the ClientApp in a fresh process).

- `dp_clip_mod`: Flower's `fixedclipping_mod` (client-side clipping of user-level DP,
  `privacy.federated = "client"`), on the train messages whose config carries the
  clipping norm, except for an update equal to what was received: it needs no
  clipping, and Flower's clipping would divide by its zero norm.
- `secagg_mod`: Flower's `secaggplus_mod` on the messages of a SecAgg+ stage
  (`federated.secagg`). In the collect stage the ClientApp trains as usual and the
  mod turns its reply into the legacy fit result the protocol masks: the update
  (trained minus received weights, which fit the quantisation's clip range far better
  than the weights) and the example count. An update with NaN or Inf is refused here
  (the server cannot screen masked inputs): the client drops out of the round.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cotune.runtime.federated.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NODE_KEY,
    WEIGHT_KEY,
    number,
)


def update_norm(sent: ArrayRecord, trained: ArrayRecord) -> float:
    """The L2 norm of `trained - sent` over all tensors (by name)."""
    total = 0.0
    for name, array in sent.items():
        diff = trained[name].numpy().astype(np.float64) - array.numpy().astype(np.float64)
        total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def dp_clip_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod: Flower's `fixedclipping_mod` on train messages whose config carries
    the clipping norm (the client-side wrapper puts it there), except for an update
    equal to what was received, which needs no clipping (and would make Flower's
    clipping divide by a zero norm). Other messages pass through."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)
    reply = call_next(msg, ctxt)
    if reply.has_error() or ARRAYS_KEY not in reply.content.array_records:
        return reply
    sent = msg.content.array_records[ARRAYS_KEY]
    trained = reply.content.array_records[ARRAYS_KEY]
    if set(sent) == set(trained):
        # Flower's mod checks the names in order: lay the reply out as received
        reply.content.array_records[ARRAYS_KEY] = ArrayRecord(
            {k: Array(trained[k].numpy()) for k in sent}
        )
        if update_norm(sent, reply.content.array_records[ARRAYS_KEY]) == 0:
            return reply
    return fixedclipping_mod(msg, ctxt, lambda _m, _c: reply)


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod: Flower's `secaggplus_mod` for train messages of a SecAgg+ stage
    (they carry its config record); everything else passes through."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, lambda m, c: _as_fit_result(m, call_next(m, c)))


def _as_fit_result(msg: Message, reply: Message) -> Message:
    """The ClientApp's reply as the legacy fit result SecAgg+ masks: the update
    (trained minus received, in the received order) and the example count."""
    if reply.has_error():
        raise RuntimeError(f"training failed: {reply.error.reason}")
    sent = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS_KEY].items()}
    trained = {k: v.numpy() for k, v in reply.content.array_records[ARRAYS_KEY].items()}
    update = []
    for name, before in sent.items():
        after = np.asarray(trained[name])
        if after.shape != before.shape:
            raise ValueError(f"{name} has shape {after.shape}, expected {before.shape}")
        if not np.all(np.isfinite(after)):
            raise ValueError(f"{name} holds NaN or Inf: the update is not sent")
        update.append((after.astype(np.float64) - before).astype(before.dtype))
    metrics = reply.content.metric_records[METRICS_KEY]
    weight = int(number(metrics[WEIGHT_KEY], WEIGHT_KEY))
    scalars: dict[str, bool | bytes | float | int | str] = {
        k: v for k, v in metrics.items() if isinstance(v, int | float)
    }
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, scalars)
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    if NODE_KEY in reply.content.config_records:  # the data it trained on (own data)
        content.config_records[NODE_KEY] = reply.content.config_records[NODE_KEY]
    return Message(content, reply_to=msg)
