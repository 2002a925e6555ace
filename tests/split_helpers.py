"""Shared helpers for the split/link tests: tiny configs, a device + cloud pair, batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from cotune.config import Config, build_config
from cotune.link.accounting import Tap
from cotune.link.auth import TokenBook
from cotune.link.service import CloudEndpoint
from cotune.link.transport import InProcessTransport, Transport
from cotune.methods.split import SplitCloud, SplitDevice, build_split
from cotune.models.rng import RngStream

TOKEN = "secret-token-0"


def tiny_cfg(family: str = "bert", **sections: dict) -> Config:
    data: dict = {
        "method": "split",
        "seed": 0,
        "model": {"name": f"tiny-{family}"},
        "split": {"cut": 2, "labels": "cloud"},
        "link": {"codec": "identity"},
        "train": {"optimizer": "sgd", "lr": 0.1, "max_grad_norm": None, "max_seq_len": 32},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return build_config(data)


def batch_for(family: str, b: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (b,), generator=g)
    if family == "vit":
        return {"pixel_values": torch.randn(b, 1, 28, 28, generator=g), "labels": labels}
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row in range(1, b):  # right padding of different lengths
        mask[row, length - 2 * row :] = 0
    ids[mask == 0] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
    }


def make_device(
    cfg: Config, transport: Transport, rng: RngStream | None = None, num_labels: int = 3
) -> SplitDevice:
    split, codec = build_split(cfg, num_labels, "classification")
    return SplitDevice(
        cfg, split, codec, transport, num_labels=num_labels, problem="classification", rng=rng
    )


def inprocess_pair(
    cfg: Config, *, rng: RngStream | None = None, tap: Tap | None = None, total_steps: int = 10
) -> tuple[SplitDevice, SplitCloud, CloudEndpoint]:
    cloud = SplitCloud(cfg, rng=rng)
    endpoint = CloudEndpoint(cloud, TokenBook({0: TOKEN}))
    device = make_device(cfg, InProcessTransport(endpoint, 0, TOKEN, tap=tap), rng=rng)
    device.connect(total_steps)
    return device, cloud, endpoint


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: one intra-op thread is much faster (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
