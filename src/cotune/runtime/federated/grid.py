"""A Grid wrapper that counts the serialised bytes of every message both ways."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from cotune.runtime.federated.network import FleetNetwork
from cotune.runtime.federated.records import message_bytes


class CountingGrid:
    """Delegates to a Flower Grid; `send_and_receive` adds the size of each message
    sent (down: server -> client) and each reply received (up: client -> server).

    Sizes are taken after the inner grid has stamped the outgoing messages (run id,
    source node), so they are the bytes that really left. Replies that arrive after
    the timeout are never pulled and are not counted. `last_down` / `last_up` hold the
    bytes per node id (to each node, from each node) of the calls since `reset_last()`
    (a round's train messages: one call, or SecAgg+'s four stages). With a `network`
    (`[link.network]`) each call's message sizes are charged to its clock; `part_of`
    maps node ids to partitions (whose devices may have links of their own).
    """

    def __init__(self, grid: Grid, network: FleetNetwork | None = None) -> None:
        self.grid = grid
        self.network = network
        self.part_of: dict[int, int] = {}
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_down: dict[int, int] = {}
        self.last_up: dict[int, int] = {}

    def reset_last(self) -> None:
        self.last_down, self.last_up = {}, {}

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        sizes: dict[str, int] = {}  # deflated object sizes, shared by the messages
        down: dict[int, list[int]] = {}
        up: dict[int, list[int]] = {}
        for msg in sent:
            node = msg.metadata.dst_node_id
            down.setdefault(node, []).append(message_bytes(msg, sizes))
        for msg in replies:
            node = msg.metadata.src_node_id
            up.setdefault(node, []).append(message_bytes(msg, sizes))
        for node, v in down.items():
            self.last_down[node] = self.last_down.get(node, 0) + sum(v)
        for node, v in up.items():
            self.last_up[node] = self.last_up.get(node, 0) + sum(v)
        if self.network is not None:
            self.network.charge(down, up, self.part_of)
        self.bytes_down += sum(sum(v) for v in down.values())
        self.bytes_up += sum(sum(v) for v in up.values())
        return replies
