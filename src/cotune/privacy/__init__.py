"""Differential privacy on what crosses the split link.

`CutNoise` clips each token row of the cut activations and adds Gaussian noise on the
device, before the codec; `noise_multiplier` / `epsilon_spent` account for it with
Opacus's accountants (RDP or PRV). Methods use it; it knows nothing of transports.
"""

from cotune.privacy.accounting import PrivacyBudget, epsilon_spent, noise_multiplier
from cotune.privacy.cut_noise import CutNoise, clip_rows, cut_noise_for

__all__ = [
    "CutNoise",
    "PrivacyBudget",
    "clip_rows",
    "cut_noise_for",
    "epsilon_spent",
    "noise_multiplier",
]
