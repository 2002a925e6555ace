"""The `pca` codec's projection: a rank-r basis of the cut activations, calibrated on a
few device batches.

The device sends `code = (h - mean) @ basis` (r values per token); the cloud rebuilds
`h_hat = code @ basis.T + mean`, so the cloud keeps the whole residual stream, compressed
to its top-r principal directions. Both maps are linear and run under autograd, so the
gradient that crosses back is the r-dim gradient of the code, and the device's gradient
is exactly the gradient of the projected forward pass. The basis and mean cross once,
in a `Calibrate` message, and are counted like everything else.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cotune.link.errors import MalformedMessage
from cotune.link.proto import pb
from cotune.link.wire import from_wire, to_wire


class PcaProjection:
    def __init__(self, width: int, rank: int) -> None:
        if not 1 <= rank <= width:
            raise ValueError(f"pca rank must be in [1, {width}], got {rank}")
        self.width = width
        self.rank = rank
        self.mean: torch.Tensor | None = None
        self.basis: torch.Tensor | None = None  # [width, rank], orthonormal columns

    @property
    def ready(self) -> bool:
        return self.basis is not None

    def calibrate(self, samples: torch.Tensor) -> None:
        """Fit mean and top-r principal directions to token rows `samples` ([M, width])."""
        x = samples.detach().to(torch.float64).reshape(-1, self.width)
        if x.shape[0] < 2:
            raise ValueError("pca calibration needs at least two token rows")
        mean = x.mean(dim=0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        basis = vh[: self.rank].T
        if basis.shape[1] < self.rank:  # fewer rows than the rank: pad with a completion
            q, _ = torch.linalg.qr(torch.cat([basis, torch.eye(self.width, dtype=x.dtype)], 1))
            basis = q[:, : self.rank]
        self.mean = mean.to(torch.float32)
        self.basis = basis.to(torch.float32).contiguous()

    def project(self, h: torch.Tensor) -> torch.Tensor:
        assert self.mean is not None and self.basis is not None, "calibrate first"
        return (h - self.mean) @ self.basis

    def reconstruct(self, code: torch.Tensor) -> torch.Tensor:
        assert self.mean is not None and self.basis is not None, "calibrate first"
        return code @ self.basis.T + self.mean

    def state(self) -> dict[str, pb.Tensor]:
        assert self.mean is not None and self.basis is not None, "calibrate first"
        return {"mean": to_wire(self.mean), "basis": to_wire(self.basis)}

    def load_state(self, state: Mapping[str, pb.Tensor]) -> None:
        """Load a `Calibrate.state` map, validating names, shapes and values."""
        parts = dict(state)
        if set(parts) != {"mean", "basis"}:
            raise MalformedMessage(f"pca state: parts {sorted(parts)} where basis, mean expected")
        mean = from_wire(parts["mean"], "pca.mean", dtypes=("float32",), shape=(self.width,))
        basis = from_wire(
            parts["basis"], "pca.basis", dtypes=("float32",), shape=(self.width, self.rank)
        )
        gram = basis.T.to(torch.float64) @ basis.to(torch.float64)
        if not torch.allclose(gram, torch.eye(self.rank, dtype=torch.float64), atol=1e-3):
            raise MalformedMessage("pca.basis: columns are not orthonormal")
        self.mean, self.basis = mean, basis
