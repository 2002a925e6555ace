"""Clipping and noising the rows of cut activations on the device, before the codec."""

from __future__ import annotations

import secrets

import torch

from cotune.config import Config
from cotune.errors import ConfigError
from cotune.privacy.accounting import PrivacyBudget


def clip_rows(rows: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row scaled to L2 norm at most `clip` (differentiable: the device's backward
    goes through the scaling)."""
    norms = rows.norm(dim=-1, keepdim=True)
    return rows * (clip / norms.clamp(min=1e-12)).clamp(max=1.0)


class CutNoise:
    """What a device applies to every [N, k] block of rows it sends: clip each row to
    `budget.clip`, add N(0, noise_std^2) to each coordinate. It counts the releases,
    training steps and evaluation passes, so the epsilon spent can be reported."""

    def __init__(self, budget: PrivacyBudget, seed: int | None = None) -> None:
        self.budget = budget
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.train_releases = 0
        self.eval_passes = 0

    def __call__(self, rows: torch.Tensor, train: bool) -> torch.Tensor:
        clipped = clip_rows(rows, self.budget.clip)
        noise = torch.randn(rows.shape, generator=self.generator, dtype=torch.float32)
        if train:
            self.train_releases += 1
        return clipped + (noise * self.budget.noise_std).to(rows.dtype)

    def metrics(self) -> dict[str, float]:
        """`epsilon` spent on the training examples so far (and on the evaluation
        examples, `eval_epsilon`, counting the evaluation now being reported)."""
        return {
            "epsilon": self.budget.spent(self.train_releases),
            "eval_epsilon": self.budget.spent_by_evaluations(self.eval_passes),
        }


def cut_noise_for(
    cfg: Config, *, n_examples: int, steps: int, image_task: bool = False
) -> CutNoise | None:
    """The device's `CutNoise` for `cfg.privacy` (None when `privacy.epsilon` is unset),
    planned for its `n_examples` training examples and `steps` training steps."""
    p = cfg.privacy
    if p.epsilon is None:
        return None
    if image_task:
        raise ConfigError(
            "[privacy] bounds an example by train.max_seq_len token rows; image tasks send "
            "patch rows, not yet covered: remove [privacy] or use a text task"
        )
    if cfg.link.codec == "pca":
        raise ConfigError(
            "[privacy] with link.codec = 'pca': the PCA calibration sends statistics of the "
            "raw activations before any noise; use identity, int8, fp16, topk or sft"
        )
    budget = PrivacyBudget.plan(
        p.epsilon, p.delta, p.clip, cfg.train.max_seq_len, cfg.train.batch_size,
        n_examples, steps, p.accountant,
    )  # fmt: skip
    return CutNoise(budget, p.noise_seed)
