"""Flower records on the wire: a model state in and out of an ArrayRecord, and the bytes a
message takes.

Flower 1.41 sends a message as a tree of content-addressed objects (the message
head, its RecordDict, each ArrayRecord, Array and ArrayChunk), each serialised by its
`deflate()` (protobuf body plus a small header); identical objects within a message
travel once. The size of a message is the sum of its distinct objects' deflated
bytes: exactly what is pushed to (or pulled from) the SuperLink, without HTTP/TLS
framing. Nothing is estimated from shapes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from cotune.methods.spec import State


def message_bytes(message: Message, sizes: dict[str, int] | None = None) -> int:
    """Serialised size of `message` (all its distinct objects, deflated).

    `sizes` memoises object id -> deflated size across calls (ids are content hashes),
    so N messages carrying the same arrays serialise them once.
    """
    sizes = {} if sizes is None else sizes
    total = 0
    for object_id, obj in get_all_nested_objects(message).items():
        if object_id not in sizes:
            sizes[object_id] = len(obj.deflate())
        total += sizes[object_id]
    return total


def messages_bytes(messages: Iterable[Message]) -> int:
    sizes: dict[str, int] = {}
    return sum(message_bytes(m, sizes) for m in messages)


def to_arrays(state: State) -> ArrayRecord:
    """A model state (name -> ndarray) as a Flower ArrayRecord, names kept in order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> State:
    """An ArrayRecord back as name -> ndarray."""
    return {k: v.numpy() for k, v in record.items()}
