"""What differs between the heads a split run can train, on both sides of the link.

The device names its problem in `Hello.problem`; both sides then agree on how the
labels are checked (the cloud validates them before they reach the loss), on what the
cloud's output is and how it crosses (U-shaped: the cloud segment's output comes down
and its gradient goes up; with labels on the cloud, the logits come down at evaluation),
and on the model output the device hands to the task's evaluation.

| problem | task kinds | cloud segment output | rows that cross | labels | evaluation output |
|---|---|---|---|---|---|
| `classification` | classification, image-classification | pooled [B, H] | B | (B,) int64 in [0, C) | `.logits` [B, C] |
| `regression` | regression | pooled [B, H] | B | (B,) float32 | `.logits` [B, 1] |
| `span` | qa | hidden states [B, L, H] | one per real token | (B, 2) int64 start / end, real tokens of the row | `.start_logits`, `.end_logits` [B, L] |

Per-token outputs cross as the activations do: one row per real token (the padding
mask is already on the cloud), scattered back to [B, L, .] with zeros at padding.
"""

from __future__ import annotations

from typing import Any

import torch

from cotune.errors import ConfigError
from cotune.link.errors import MalformedMessage
from cotune.link.proto import pb
from cotune.link.wire import from_wire
from cotune.methods.split.protocol import real_token_rows, scatter_rows
from cotune.models.classifier import ClassifierOutput
from cotune.models.span import SpanOutput


class Problem:
    """A per-sequence head (pooled features, one label per sequence); subclasses say
    how labels are checked and, for per-token heads, how the rows are laid out."""

    name = ""
    outputs: int | None = None  # the head's outputs per row, when the problem fixes it

    # ------------------------------------------------------------ the rows that cross

    def rows(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The cloud's output (or logits) as the rows that cross ([B, k] as is)."""
        return x

    def unrows(
        self, rows: torch.Tensor, mask: torch.Tensor | None, batch: int, length: int
    ) -> torch.Tensor:
        """Back from the rows to what the head reads (differentiable in `rows`)."""
        return rows

    def n_rows(self, mask: torch.Tensor | None, batch: int, length: int) -> int:
        return batch

    # ------------------------------------------------------------ labels and outputs

    def labels(
        self, wire: pb.Tensor, mask: torch.Tensor | None, batch: int, length: int,
        num_labels: int,
    ) -> torch.Tensor:  # fmt: skip
        """The validated labels of a Forward (`MalformedMessage` if not valid)."""
        raise NotImplementedError

    def logits(self, out: Any) -> torch.Tensor:
        """The head output's logits as one tensor (what crosses at evaluation)."""
        return torch.as_tensor(out.logits)

    def output(self, loss: torch.Tensor, logits: torch.Tensor) -> Any:
        """The model output of an evaluation forward, from the loss and the logits."""
        return ClassifierOutput(loss=loss, logits=logits)


class Classification(Problem):
    name = "classification"

    def labels(
        self, wire: pb.Tensor, mask: torch.Tensor | None, batch: int, length: int,
        num_labels: int,
    ) -> torch.Tensor:  # fmt: skip
        labels = from_wire(wire, "forward.labels", dtypes=("int64",), shape=(batch,))
        if bool((labels < 0).any()) or bool((labels >= num_labels).any()):
            raise MalformedMessage(f"forward.labels: a label is outside [0, {num_labels})")
        return labels


class Regression(Problem):
    name = "regression"
    outputs = 1

    def labels(
        self, wire: pb.Tensor, mask: torch.Tensor | None, batch: int, length: int,
        num_labels: int,
    ) -> torch.Tensor:  # fmt: skip
        return from_wire(wire, "forward.labels", dtypes=("float32",), shape=(batch,))


class PerToken(Problem):
    """A head on every token: the cloud's output and the logits cross as real-token rows."""

    def rows(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return real_token_rows(x, mask)

    def unrows(
        self, rows: torch.Tensor, mask: torch.Tensor | None, batch: int, length: int
    ) -> torch.Tensor:
        return scatter_rows(rows, mask, batch, length)

    def n_rows(self, mask: torch.Tensor | None, batch: int, length: int) -> int:
        return batch * length if mask is None else int(mask.bool().sum())


class Span(PerToken):
    """Extractive QA: start and end logits per token; labels are (start, end) positions."""

    name = "span"
    outputs = 2

    def labels(
        self, wire: pb.Tensor, mask: torch.Tensor | None, batch: int, length: int,
        num_labels: int,
    ) -> torch.Tensor:  # fmt: skip
        labels = from_wire(wire, "forward.labels", dtypes=("int64",), shape=(batch, 2))
        # a label must point at one of its row's real tokens
        real = torch.full((batch,), length) if mask is None else mask.bool().sum(dim=1)
        if bool((labels < 0).any()) or bool((labels >= real.unsqueeze(1)).any()):
            raise MalformedMessage("forward.labels: a start or end is outside its row's tokens")
        return labels

    def logits(self, out: Any) -> torch.Tensor:
        return torch.stack([out.start_logits, out.end_logits], dim=-1)

    def output(self, loss: torch.Tensor, logits: torch.Tensor) -> SpanOutput:
        return SpanOutput(loss=loss, start_logits=logits[..., 0], end_logits=logits[..., 1])


PROBLEMS: dict[str, Problem] = {p.name: p for p in (Classification(), Regression(), Span())}

# the problem a task kind trains (a kind absent here trains its own name)
_OF_KIND = {"image-classification": "classification", "qa": "span"}


def problem_for(kind: str, num_labels: int) -> tuple[str, int]:
    """(problem, outputs per row) a split run trains for a task of `kind` with
    `num_labels` labels; a `ConfigError` for a kind no split head handles."""
    name = _OF_KIND.get(kind, kind)
    if name not in PROBLEMS:
        raise ConfigError(
            f"split cannot train a task of kind {kind!r}; kinds it can: "
            f"classification, regression, image-classification, qa"
        )
    outputs = PROBLEMS[name].outputs
    return name, num_labels if outputs is None else outputs
