"""Inverting what crosses the cut: how much of a device's input an honest-but-curious
cloud recovers from the rows it receives.

The attacker is the cloud of a split run. It knows what the protocol tells it: the
model and cut (it builds the same pre-trained model from the same seed), the codec, and
the noise scale of `[privacy]` (public). It does not know the device's data, nor the
device's fine-tuned weights. It trains an *inverter* on public text (BBC News): the
public sentences go through its own copy of the device segment, the codec (and the
noise, if any), and a classifier learns to map each row back to the token at that
position. The inverter is then applied to the rows the device really sends for its
own data (through the device's real segment: initial weights before fine-tuning,
trained weights after), and we count the tokens it gets exactly right.

- `cut_rows`: (rows as the cloud decodes them, the token id at each row) for texts
  (`segment_rows` then `through_link`, usable apart to reuse one segment's rows);
- `train_inverter`: a linear or one-hidden-layer classifier over the public vocabulary;
- `recovery`: exact-token recovery over real (non-special) tokens, overall and on the
  most label-informative tokens;
- `informative_tokens`: the tokens whose presence most shifts the label distribution
  (sentiment words on SST-2), chosen from the device's labelled examples by the
  measurer (not the attacker).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cotune.link.codecs import Codec

RowsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CutRows:
    rows: torch.Tensor  # [N, width] as the cloud decodes them
    ids: torch.Tensor  # [N] the input token at each row
    example: torch.Tensor  # [N] which text each row came from


@torch.no_grad()
def segment_rows(
    segment: nn.Module,
    tokenizer: object,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 32,
    skip_ids: Sequence[int] = (),
) -> CutRows:
    """Run `texts` through the device `segment`; the rows of real tokens other than
    `skip_ids`, as the segment outputs them (before any noise or codec)."""
    segment.eval()
    skip = torch.tensor(sorted(set(skip_ids)), dtype=torch.long)
    rows, ids, example = [], [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(  # type: ignore[operator]
            list(texts[start : start + batch_size]), truncation=True, max_length=max_length,
            padding=True, return_tensors="pt",
        )  # fmt: skip
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        hidden, mask = segment(**inputs)
        mask = inputs["attention_mask"].bool() if mask is None else mask.bool()
        tok = inputs["input_ids"][mask]
        which = torch.arange(start, start + hidden.shape[0]).unsqueeze(1).expand_as(mask)[mask]
        keep = ~torch.isin(tok, skip)
        rows.append(hidden[mask].float()[keep])
        ids.append(tok[keep])
        example.append(which[keep])
    return CutRows(torch.cat(rows), torch.cat(ids), torch.cat(example))


@torch.no_grad()
def through_link(
    raw: CutRows, codec: Codec, *, noise: RowsFn | None = None, chunk: int = 4096
) -> CutRows:
    """The rows of `raw` as the cloud decodes them: (noise,) then the codec's encode
    and decode, in chunks of `chunk` rows (the codecs work row by row)."""
    out = []
    for i in range(0, raw.rows.shape[0], chunk):
        sent = raw.rows[i : i + chunk]
        if noise is not None:
            sent = noise(sent)
        out.append(
            codec.forward.decode(codec.forward.encode(sent), "rows", sent.shape[0], sent.shape[1])
        )
    return CutRows(torch.cat(out), raw.ids, raw.example)


def cut_rows(
    segment: nn.Module,
    codec: Codec,
    tokenizer: object,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 32,
    noise: RowsFn | None = None,
    skip_ids: Sequence[int] = (),
) -> CutRows:
    """Run `texts` through the device `segment`, (noise,) encode and decode with `codec`
    (what the cloud holds); keep the rows of real tokens other than `skip_ids`."""
    raw = segment_rows(segment, tokenizer, texts, max_length=max_length,
                       batch_size=batch_size, skip_ids=skip_ids)  # fmt: skip
    return through_link(raw, codec, noise=noise)


class Inverter(nn.Module):
    """Row -> token over the attacker's vocabulary (the public data's tokens), on
    standardised rows; `hidden` > 0 adds one GELU layer."""

    vocab: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, width: int, vocab: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 hidden: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("vocab", vocab)  # class index -> token id
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        n = int(vocab.numel())
        self.net: nn.Module = (
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, n))
            if hidden
            else nn.Linear(width, n)
        )

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net((rows - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, rows: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """The token id predicted for every row."""
        self.eval()
        out = [self(rows[i : i + batch]).argmax(-1) for i in range(0, rows.shape[0], batch)]
        return self.vocab[torch.cat(out)]


def train_inverter(
    public: CutRows,
    *,
    steps: int = 1500,
    batch_size: int = 512,
    lr: float = 2e-3,
    hidden: int = 0,
    seed: int = 0,
) -> Inverter:
    """Fit an `Inverter` on the public rows with cross-entropy (Adam, cosine decay)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vocab, target = torch.unique(public.ids, return_inverse=True)
    mean = public.rows.mean(0)
    std = public.rows.std(0).clamp(min=1e-6)
    inv = Inverter(public.rows.shape[1], vocab, mean, std, hidden)
    if steps <= 0:
        return inv
    opt = torch.optim.Adam(inv.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n = public.rows.shape[0]
    inv.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        loss = nn.functional.cross_entropy(inv(public.rows[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return inv


def informative_tokens(
    ids_per_example: Sequence[Sequence[int]], labels: Sequence[int], *, top: int = 100,
    min_count: int = 5,
) -> list[int]:  # fmt: skip
    """The `top` tokens whose presence most shifts the label distribution: by the
    largest |log-odds of a label given the token - its prior log-odds| (add-one
    smoothed), among tokens in at least `min_count` examples."""
    n = len(labels)
    by_label = Counter(labels)
    with_token: Counter[int] = Counter()
    with_token_label: Counter[tuple[int, int]] = Counter()
    for ids, y in zip(ids_per_example, labels, strict=True):
        for t in set(ids):
            with_token[t] += 1
            with_token_label[(t, y)] += 1
    scores: list[tuple[float, int]] = []
    for t, nt in with_token.items():
        if nt < min_count:
            continue
        best = 0.0
        for y, ny in by_label.items():
            k = with_token_label[(t, y)]
            given = math.log((k + 1) / (nt - k + 1))
            prior = math.log((ny + 1) / (n - ny + 1))
            best = max(best, abs(given - prior))
        scores.append((best, t))
    return [t for _, t in sorted(scores, reverse=True)[:top]]


def recovery(predicted: torch.Tensor, true: torch.Tensor, among: Sequence[int] = ()) -> float:
    """Share of rows whose token is predicted exactly (only rows whose true token is in
    `among`, when given); NaN when there is no such row."""
    if among:
        sel = torch.isin(true, torch.tensor(list(among), dtype=torch.long))
        predicted, true = predicted[sel], true[sel]
    if true.numel() == 0:
        return float("nan")
    return float((predicted == true).float().mean())


def majority_floor(public: CutRows, device: CutRows, among: Sequence[int] = ()) -> float:
    """What guessing the public data's most frequent token everywhere recovers."""
    guess = torch.full_like(device.ids, int(torch.mode(public.ids).values))
    return recovery(guess, device.ids, among)
