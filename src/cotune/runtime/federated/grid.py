"""A Grid wrapper that counts the serialised bytes of every message both ways."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from cotune.runtime.federated.records import messages_bytes


class CountingGrid:
    """Delegates to a Flower Grid; `send_and_receive` adds the size of each message
    sent (down: server -> client) and each reply received (up: client -> server).

    Sizes are taken after the inner grid has stamped the outgoing messages (run id,
    source node), so they are the bytes that really left. Replies that arrive after
    the timeout are never pulled and are not counted.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.bytes_up = 0
        self.bytes_down = 0

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.bytes_down += messages_bytes(sent)
        self.bytes_up += messages_bytes(replies)
        return replies
