"""User-level differential privacy of federated rounds with Flower's own wrappers.

`RoundsDP` wraps cotune's FedAvg (`CotuneFedAvg`) in Flower's
`DifferentialPrivacyServerSideFixedClipping` (each update clipped on the server) or
`DifferentialPrivacyClientSideFixedClipping` (clipped on the client by `dp_clip_mod`,
around Flower's `fixedclipping_mod`); either adds Gaussian noise of std
`noise_multiplier * clip / sampled` to the round's average, the multiplier set by
Opacus's accountant from the target (`cotune.privacy.RoundsBudget`).

What cotune adds around Flower's code, and why:
- replies are screened first (errors, wrong shapes, NaN) and only the good ones are
  clipped and averaged (Flower's wrapper drops a whole round when one client fails);
- every client weighs the same and the average divides by the planned number of
  clients however many replied (so one client moves it by at most clip / sampled,
  the sensitivity the noise is calibrated to);
- an update equal to what was sent (norm 0) is not handed to Flower's clipping, which
  divides by the norm: it needs no clipping and joins the average as it is;
- the noise is drawn from its own generator (`privacy.noise_seed`, else the OS's
  entropy), never from the numpy state the run's seed sets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from cotune.privacy import RoundsBudget
from cotune.runtime.federated.client_mods import update_norm
from cotune.runtime.federated.keys import ARRAYS_KEY
from cotune.runtime.federated.strategy import CotuneFedAvg, QuietFlower


class _Averager(Strategy):
    """What Flower's wrapper wraps: cotune's FedAvg, plus the unchanged updates the
    wrapper must not clip (`held`), which join the average after it."""

    def __init__(self, strategy: CotuneFedAvg) -> None:
        self.strategy = strategy
        self.held: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, [*replies, *self.held])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        pass


class RoundsDP:
    """cotune's FedAvg behind Flower's fixed-clipping DP wrapper (`budget.mode`:
    "server" or "client"). `configure_train` / `aggregate_train` as a strategy's."""

    def __init__(
        self, strategy: CotuneFedAvg, budget: RoundsBudget, noise_seed: int | None
    ) -> None:
        strategy.prescreened, strategy.uniform = True, True
        strategy.denominator = budget.sampled
        self.strategy, self.budget, self.noise_seed = strategy, budget, noise_seed
        self.inner = _Averager(strategy)
        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if budget.mode == "server"
            else DifferentialPrivacyClientSideFixedClipping
        )
        self.flower = wrapper(self.inner, budget.sigma, budget.clip, budget.sampled)
        self._sent = ArrayRecord()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        return self.flower.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self.strategy.screen(replies)
        moved: list[Message] = []
        held: list[Message] = []
        for msg in kept:
            trained = msg.content.array_records[ARRAYS_KEY]
            # Flower clips by position: lay the reply out in the global state's order
            ordered = ArrayRecord({k: trained[k] for k in self._sent})
            msg.content.array_records[ARRAYS_KEY] = ordered
            (moved if update_norm(self._sent, ordered) > 0 else held).append(msg)
        self.inner.held = held
        saved = np.random.get_state()
        np.random.seed(self._noise_seed(server_round))
        try:
            with QuietFlower():
                return self.flower.aggregate_train(server_round, moved)
        finally:
            np.random.set_state(saved)
            self.inner.held = []

    def _noise_seed(self, server_round: int) -> np.ndarray:
        """A full MT19937 seed (624 words) for Flower's `np.random.normal` draws."""
        if self.noise_seed is None:
            return np.frombuffer(os.urandom(624 * 4), dtype=np.uint32)
        seq = np.random.SeedSequence([self.noise_seed, server_round])
        return seq.generate_state(624, dtype=np.uint32)

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """`epsilon` spent per client after `server_round` rounds (each counted as a
        release: an upper bound when a round released nothing)."""
        return {"epsilon": self.budget.spent(server_round)}
