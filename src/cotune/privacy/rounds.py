"""User-level differential privacy of federated rounds: the noise, from the target.

Each round releases one average of the sampled clients' updates, every update clipped
to L2 norm `clip` (one client changes the average by at most clip / sampled when the
average is taken over the planned sample size) plus Gaussian noise of std
`sigma * clip / sampled` (what Flower's fixed-clipping wrappers add). One round is
one step of the subsampled Gaussian mechanism at rate sampled / clients; Opacus's
accountant (`accounting`) finds `sigma` for the run's rounds and tells what has been
spent after each. No transport here: the runtime applies it with Flower.
"""

from __future__ import annotations

from dataclasses import dataclass

from cotune.privacy.accounting import epsilon_spent, noise_multiplier


@dataclass(frozen=True)
class RoundsBudget:
    """The noise of a federated run, set before its first round."""

    epsilon: float
    delta: float
    clip: float
    clients: int
    sampled: int  # clients per round
    rounds: int
    accountant: str
    sigma: float  # noise multiplier: noise std / (clip / sampled)
    mode: str  # "server" | "client": where the updates are clipped

    @classmethod
    def plan(
        cls, epsilon: float, delta: float, clip: float, clients: int, sampled: int,
        rounds: int, accountant: str = "rdp", mode: str = "server",
    ) -> RoundsBudget:  # fmt: skip
        rate = sampled / clients
        sigma = noise_multiplier(epsilon, delta, rate, rounds, accountant)
        return cls(epsilon, delta, clip, clients, sampled, rounds, accountant, sigma, mode)

    @property
    def sample_rate(self) -> float:
        return self.sampled / self.clients

    @property
    def noise_std(self) -> float:
        """Std of the noise added to every coordinate of the round's average update."""
        return self.sigma * self.clip / self.sampled

    def spent(self, rounds: int) -> float:
        """Epsilon spent per client after `rounds` noised releases."""
        return epsilon_spent(self.sigma, self.delta, self.sample_rate, rounds, self.accountant)

    def summary(self) -> dict[str, float | int | str]:
        return {
            "unit": "client", "clipping": self.mode, "target_epsilon": self.epsilon,
            "delta": self.delta, "clip": self.clip, "clients": self.clients,
            "sampled_per_round": self.sampled, "sample_rate": self.sample_rate,
            "rounds": self.rounds, "accountant": self.accountant,
            "noise_multiplier": self.sigma, "noise_std": self.noise_std,
        }  # fmt: skip
