"""A Grid wrapper that counts the serialised bytes of every message both ways."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from cotune.runtime.federated.records import message_bytes


class CountingGrid:
    """Delegates to a Flower Grid; `send_and_receive` adds the size of each message
    sent (down: server -> client) and each reply received (up: client -> server).

    Sizes are taken after the inner grid has stamped the outgoing messages (run id,
    source node), so they are the bytes that really left. Replies that arrive after
    the timeout are never pulled and are not counted. `last_down` / `last_up` hold the
    last call's bytes per node id (to each node, from each node).
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_down: dict[int, int] = {}
        self.last_up: dict[int, int] = {}

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        sizes: dict[str, int] = {}  # deflated object sizes, shared by the messages
        self.last_down, self.last_up = {}, {}
        for msg in sent:
            node = msg.metadata.dst_node_id
            self.last_down[node] = self.last_down.get(node, 0) + message_bytes(msg, sizes)
        for msg in replies:
            node = msg.metadata.src_node_id
            self.last_up[node] = self.last_up.get(node, 0) + message_bytes(msg, sizes)
        self.bytes_down += sum(self.last_down.values())
        self.bytes_up += sum(self.last_up.values())
        return replies
