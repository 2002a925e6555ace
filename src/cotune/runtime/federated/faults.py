"""Injected client failures (`[federated.faults]`): the server marks some of each
round's train messages, the ClientApp's `fault_mod` fails the marked ones.

The server draws the marked clients (seeded by the faults seed and the round, so a
rerun fails the same clients) and writes the kind of failure into each marked
message's config record (`FAULT_KEY`, and for "timeout" the round's deadline as a
Unix time, `FAULT_UNTIL_KEY`). The mod then raises (Flower turns that into an error
reply: `clients_failed`), or holds the reply until the deadline has passed and a
second more (the server has stopped waiting: `clients_timed_out`). Messages without
the mark pass through untouched, so the mod sits in the standard ClientApp.

Kept import-light (no torch): a SuperNode loads the ClientApp in a fresh process.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from cotune.runtime.federated.keys import CONFIG_KEY, number

FAULT_KEY = "cotune-fault"  # "raise" | "timeout" in a marked train message's config
FAULT_UNTIL_KEY = "cotune-fault-until"  # Unix time a "timeout" client holds its reply to
TIMEOUT_MARGIN = 1.0  # seconds past the deadline the held reply is released


def faulty_clients(
    sampled: Sequence[int], fail_fraction: float, mode: str, seed: int, rnd: int
) -> dict[int, str]:
    """partition -> "raise" | "timeout": `fail_fraction` of the `sampled` partitions
    (rounded up), drawn with a generator seeded with (seed, round)."""
    if fail_fraction <= 0 or not sampled:
        return {}
    k = min(len(sampled), math.ceil(fail_fraction * len(sampled) - 1e-9))
    rng = random.Random(f"cotune-faults/{seed}/{rnd}")
    chosen = sorted(rng.sample(sorted(sampled), k))
    kinds = {p: mode if mode != "mixed" else rng.choice(("raise", "timeout")) for p in chosen}
    return kinds


def mark(
    messages: list[Message], kinds: dict[int, str], part_of: dict[int, int], deadline: float
) -> list[Message]:
    """Write each marked client's failure (and for "timeout" the round's `deadline`, a
    Unix time) into its train message's config record (a copy: the messages of a round
    share one record)."""
    for msg in messages:
        kind = kinds.get(part_of[msg.metadata.dst_node_id])
        if kind is None:
            continue
        records = dict(msg.content.items())
        config = dict(msg.content.config_records[CONFIG_KEY].items())
        config[FAULT_KEY] = kind
        if kind == "timeout":
            config[FAULT_UNTIL_KEY] = deadline
        records[CONFIG_KEY] = ConfigRecord(config)
        msg.content = RecordDict(records)
    return messages


class InjectedFault(RuntimeError):
    """The failure `[federated.faults]` asked this client to have."""


def fault_mod(
    message: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """A Flower mod: fail a train message the server marked, pass the rest on."""
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    config = message.content.config_records.get(CONFIG_KEY)
    kind = None if config is None else config.get(FAULT_KEY)
    if kind is None:
        return call_next(message, context)
    rnd = config.get("server-round") if config is not None else None
    where = f"round {rnd!s}, node {context.node_config.get('partition-id', '?')!s}"
    if kind == "timeout" and config is not None:
        until = number(config[FAULT_UNTIL_KEY], FAULT_UNTIL_KEY)
        time.sleep(max(0.0, until - time.time()) + TIMEOUT_MARGIN)
        raise InjectedFault(f"injected timeout (federated.faults), {where}: replied too late")
    raise InjectedFault(f"injected failure (federated.faults), {where}")
