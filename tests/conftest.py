"""Shared fixtures. Plain helper functions are in helpers.py.

`one_thread` is not autouse: it is applied (`pytestmark = pytest.mark.usefixtures(
"one_thread")`) to the modules that train tiny models in this process (split, link and
memory tests), as before. Other modules keep the process's thread count, which the runs
they start set from `train.threads`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: one intra-op thread is much faster (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
