"""Differential privacy: on what crosses the split link, and of federated rounds.

`CutNoise` clips each token row of the cut activations and adds Gaussian noise on the
device, before the codec; `noise_multiplier` / `epsilon_spent` account for it with
Opacus's accountants (RDP or PRV). `RoundsBudget` sets the noise of user-level DP in
federated rounds. Methods use them; they know nothing of transports.
"""

from cotune.privacy.accounting import PrivacyBudget, epsilon_spent, noise_multiplier
from cotune.privacy.cut_noise import CutNoise, clip_rows, cut_noise_for
from cotune.privacy.rounds import RoundsBudget

__all__ = [
    "CutNoise",
    "PrivacyBudget",
    "RoundsBudget",
    "clip_rows",
    "cut_noise_for",
    "epsilon_spent",
    "noise_multiplier",
]
