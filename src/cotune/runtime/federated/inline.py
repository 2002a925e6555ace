"""An in-process Grid: the ClientApp runs in this process, one message at a time.

Neither engine (no Ray, no SuperLink): for tests and debugging, where starting Ray or
a SuperLink costs more than the work. The ServerApp and ClientApp are the same
objects the engines run. A client that overruns the round timeout is abandoned (its
thread is left to finish in the background and its reply is dropped), so clients
that time out must not touch shared state afterwards; the engines have no such
limit. Each node gets its own copy of a message, as over a wire.
"""

from __future__ import annotations

import copy
import random
import threading
import time
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from cotune.config import Config
from cotune.runtime.federated.keys import NUM_PARTITIONS_KEY, PARTITION_KEY, NodeConfig
from cotune.runtime.federated.server import ServerOptions


class InlineGrid(Grid):
    """`n_nodes` virtual SuperNodes (random node ids, partition-id 0..n-1, or the node
    configs given) served by calling `client_app` directly."""

    def __init__(
        self, client_app: ClientApp, n_nodes: int, node_configs: list[NodeConfig] | None = None
    ) -> None:
        ids = random.SystemRandom()
        self.client_app = client_app
        configs: list[NodeConfig] = node_configs or [
            {PARTITION_KEY: i, NUM_PARTITIONS_KEY: n_nodes} for i in range(n_nodes)
        ]
        self.contexts = {
            ids.getrandbits(62): Context(
                run_id=0, node_id=0, node_config=dict(config), state=RecordDict(), run_config={}
            )
            for config in configs
        }
        self._run = Run.create_empty(run_id=0)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _handle(self, message: Message, deadline: float | None) -> Message | None:
        out: list[Message] = []
        # the node gets its own copy, as over a wire: a mod that edits its message
        # (SecAgg+'s pops its stage) must not edit the server's, shared by many nodes
        message = copy.deepcopy(message)

        def call() -> None:
            context = self.contexts[message.metadata.dst_node_id]
            try:
                out.append(self.client_app(message, context))
            except Exception as err:  # reported to the server as Flower does
                reason = f"{type(err)}:<'{err}'>"
                out.append(
                    Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
                )

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return out[0] if out else None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return list(self._push(messages, None))

    def _push(self, messages: Iterable[Message], deadline: float | None) -> Iterable[str]:
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            if deadline is not None and time.monotonic() >= deadline:
                continue
            reply = self._handle(message, deadline)
            if reply is not None:
                self._replies[message_id] = reply
            yield message_id

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.pull_messages(list(self._push(messages, deadline)))


def run_inline(
    cfg: Config,
    options: ServerOptions,
    client_app: ClientApp | None = None,
    node_configs: list[NodeConfig] | None = None,
) -> None:
    """Run the ServerApp against an InlineGrid of `federated.clients` nodes (or one
    per node config)."""
    from cotune.runtime.federated.apps import build_server_app
    from cotune.runtime.federated.apps import client_app as default_client_app

    n_nodes = len(node_configs) if node_configs is not None else cfg.federated.clients
    grid = InlineGrid(client_app or default_client_app, n_nodes, node_configs)
    server = build_server_app(options.to_run_config())
    # Messages stamp themselves with the process's task identity, as in the engines.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID
    try:
        server(
            grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        )
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
