"""Privacy accounting with Opacus's accountants (no hand-written accounting).

The mechanism is the subsampled Gaussian one of DP-SGD, applied to what a device
sends instead of to gradients: at each training step a batch of `batch_size` out of the
device's `n_examples` is released, each example's rows bounded in L2 norm (the
sensitivity) and perturbed with Gaussian noise of std `sigma * sensitivity`. The
accountant assumes Poisson sampling at rate batch_size / n_examples, as Opacus does for
DP-SGD; cotune's loader shuffles and takes fixed-size batches, the usual approximation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from cotune.errors import ConfigError


def _accountant(name: str):  # type: ignore[no-untyped-def]
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:  # pragma: no cover - opacus is a dependency
        raise ConfigError(
            "[privacy] needs the opacus package for its accountant: pip install opacus"
        ) from None
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (noise std / sensitivity) with which `steps`
    releases at `sample_rate` spend at most `epsilon` at `delta`."""
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate {sample_rate} is outside (0, 1]: batch larger than data?")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # "optimal order is the largest alpha": bound is valid
        warnings.simplefilter("ignore")
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=max(steps, 1),
                    accountant=accountant,
                    epsilon_tolerance=0.01,
                )  # fmt: skip
            )
        except ValueError as err:
            raise ConfigError(
                f"privacy.epsilon = {epsilon} at delta = {delta} cannot be reached in {steps} "
                f"steps at sample rate {sample_rate:.4g} ({err}); raise epsilon or delta"
            ) from None


def epsilon_spent(
    sigma: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Epsilon at `delta` after `steps` releases with noise multiplier `sigma`."""
    if steps <= 0:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class PrivacyBudget:
    """A device's noise, set before training from its target and its data.

    `sensitivity` is what one example can change in one release: every token row is
    clipped to `clip`, and an example sends at most `max_rows` rows, so clip *
    sqrt(max_rows) (rows of one example change together: the layers before the cut
    mix tokens through attention).
    """

    epsilon: float
    delta: float
    clip: float
    max_rows: int
    sample_rate: float
    steps: int
    accountant: str
    sigma: float

    @classmethod
    def plan(
        cls, epsilon: float, delta: float, clip: float, max_rows: int,
        batch_size: int, n_examples: int, steps: int, accountant: str = "rdp",
    ) -> PrivacyBudget:  # fmt: skip
        rate = min(1.0, batch_size / max(n_examples, 1))
        sigma = noise_multiplier(epsilon, delta, rate, steps, accountant)
        return cls(epsilon, delta, clip, max_rows, rate, steps, accountant, sigma)

    @property
    def sensitivity(self) -> float:
        return self.clip * math.sqrt(self.max_rows)

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise added to every coordinate of every row."""
        return self.sigma * self.sensitivity

    def spent(self, steps: int) -> float:
        """Epsilon spent on the training examples after `steps` training releases."""
        return epsilon_spent(self.sigma, self.delta, self.sample_rate, steps, self.accountant)

    def spent_by_evaluations(self, passes: int) -> float:
        """Epsilon spent on the evaluation examples after `passes` evaluations (each
        sends every evaluation example once, with the same noise)."""
        return epsilon_spent(self.sigma, self.delta, 1.0, passes, self.accountant)

    def summary(self) -> dict[str, float | int | str]:
        return {
            "target_epsilon": self.epsilon, "delta": self.delta, "clip": self.clip,
            "max_rows": self.max_rows, "sample_rate": self.sample_rate, "steps": self.steps,
            "accountant": self.accountant, "noise_multiplier": self.sigma,
            "noise_std": self.noise_std,
        }  # fmt: skip
