"""Statistics for repeated runs and per-example evaluations (numpy and scipy, seeded).

Two sources of noise, two intervals:

- **Across seeds** (`t_interval`): the runs of one config with different `seed`s are
  independent draws of the training outcome; their mean and its Student-t interval
  (`mean +- t_{n-1, (1+c)/2} * s / sqrt(n)`, `s` the sample standard deviation) say where
  the expected metric of the config lies. It needs 2 seeds or more, assumes the
  per-seed values are roughly normal, and with 3 to 5 seeds it is wide by construction.
- **Across eval examples** (`bootstrap_interval`, `paired_bootstrap_interval`): one run
  scored on n examples is one draw of the eval set; resampling the examples with
  replacement (percentile bootstrap) gives the interval of the metric that comes from
  the size of the eval set alone. Two runs scored on the *same* examples are compared
  with a *paired* bootstrap: every resample draws one set of example indices and
  scores both runs on it, so the difference's interval reflects only how the two
  runs disagree, not which examples happened to be drawn. Identical predictions give
  a difference of exactly 0 in every resample, so the interval is [0, 0]. Seed groups
  are paired seed by seed (`paired_bootstrap_mean_interval`): the mean over seeds of
  each seed's difference, with one set of indices for all seeds when they share their
  eval examples, and independent indices per seed when each seed has its own (a task
  whose eval subsample or split depends on the seed, e.g. bbc-news).

A statistic here is a function of resampled example indices (`IndexStatistic`: rows of
indices, shape (B, n), to B values), so one resampling scheme serves every metric and
paired statistics share their indices. `metric_statistic` builds one from a run's
predictions.jsonl for the metrics that can be recomputed from per-example records:

| metric | from | cost per resample |
|---|---|---|
| `accuracy` | the mean of `correct` | vectorised: O(n) |
| `mcc` | Matthews correlation of `label`, `prediction` from each resample's confusion matrix (scikit-learn's multi-class formula) | vectorised: O(n) |
| `pearson`, `spearman` | scipy, of `prediction` against `label` (regression) | O(n log n) |
| `exact_match`, `f1` (extractive QA) | the mean of each question's own score (SQuAD's metrics are means over questions) | vectorised: O(n) |
| `bleu` | sacrebleu's per-sentence sufficient statistics (13a tokens, lower-cased, all references), summed over the resampled inputs: the corpus BLEU of the resample | O(n) sums; the n-gram matching is done once |

The records are those of one eval split (`compare` takes the first). Others are not
supported: `accuracy_mm` (MNLI's second split), a classification `f1` (binary or macro depends on
the task's label count, which predictions.jsonl does not carry), `nist`, `meteor`, `rouge_l` and `cider` (corpus
metrics whose per-resample recomputation would run pycocoevalcap's Java tools or nltk on
every resample: seconds to minutes each).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
CHUNK_ELEMENTS = 2_000_000  # indices drawn at once (bounds memory for large eval sets)

# rows of example indices, shape (B, n) -> the statistic of each row, shape (B,)
IndexStatistic = Callable[[np.ndarray], np.ndarray]

PER_EXAMPLE_METRICS = ("accuracy", "mcc", "pearson", "spearman", "bleu", "exact_match", "f1")


@dataclass(frozen=True)
class Interval:
    """A point estimate and a two-sided interval at `confidence`.

    `method` says how it was made: "t" (Student t over `n` seeds), "bootstrap"
    (percentile bootstrap over `n` examples, `resamples` draws) or "paired-bootstrap"
    (the same, of a difference of two runs on the same examples)."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    n: int
    resamples: int | None = None
    seed: int | None = None

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def excludes(self, value: float = 0.0) -> bool:
        """True when `value` lies outside the interval (False if it is undefined)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return False
        return bool(value < self.low or value > self.high)

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "half_width": self.half_width,
            "confidence": self.confidence,
            "method": self.method,
            "n": self.n,
            **({"resamples": self.resamples} if self.resamples is not None else {}),
            **({"seed": self.seed} if self.seed is not None else {}),
        }


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


# ----------------------------------------------------------------------------- seeds


def sample_std(values: Sequence[float] | np.ndarray) -> float:
    """The sample standard deviation (ddof 1); nan for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.std(ddof=1)) if len(x) >= 2 else float("nan")


def t_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """The mean of `values` (one per seed) and its Student-t interval with n - 1 degrees
    of freedom; the bounds are nan for a single value."""
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("t_interval needs a non-empty list of values")
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), confidence, "t", n)
    half = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * sample_std(x) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, confidence, "t", n)


def seed_summary(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """What aggregate.json holds for one metric: the per-seed values, their mean, sample
    standard deviation and t-interval."""
    ci = t_interval(values, confidence)
    return {
        "values": [float(v) for v in values],
        "mean": ci.estimate,
        "std": sample_std(values),
        "low": ci.low,
        "high": ci.high,
        "half_width": ci.half_width,
    }


# ----------------------------------------------------------------------------- bootstrap


Seed = int | np.random.SeedSequence


def resampled_indices(n: int, resamples: int, seed: Seed) -> Iterator[np.ndarray]:
    """`resamples` rows of n indices drawn uniformly with replacement from range(n), in
    chunks (seeded: the same `seed` gives the same rows)."""
    if n < 1:
        raise ValueError("cannot resample an empty set of examples")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, CHUNK_ELEMENTS // n)
    done = 0
    while done < resamples:
        rows = min(per_chunk, resamples - done)
        yield rng.integers(0, n, size=(rows, n))
        done += rows


def bootstrap_distribution(
    statistic: IndexStatistic,
    n: int,
    resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
) -> np.ndarray:
    """The statistic on each of `resamples` bootstrap resamples of n examples."""
    return np.concatenate(
        [
            np.asarray(statistic(idx), dtype=np.float64)
            for idx in resampled_indices(n, resamples, seed)
        ]
    )


def _on_all(statistic: IndexStatistic, n: int) -> float:
    """The statistic of all n examples."""
    return float(np.asarray(statistic(np.arange(n)[None, :]), dtype=np.float64)[0])


def _percentile_interval(
    statistic: IndexStatistic,
    n: int,
    confidence: float,
    resamples: int,
    seed: int,
    method: str,
) -> Interval:
    _check_confidence(confidence)
    dist = bootstrap_distribution(statistic, n, resamples, seed)
    return _from_distribution(_on_all(statistic, n), dist, confidence, method, n, resamples, seed)


def _from_distribution(
    estimate: float,
    dist: np.ndarray,
    confidence: float,
    method: str,
    n: int,
    resamples: int,
    seed: int,
) -> Interval:
    if np.isnan(dist).all():
        low = high = float("nan")
    else:
        alpha = (1.0 - confidence) / 2.0
        low, high = (float(q) for q in np.nanquantile(dist, [alpha, 1.0 - alpha]))
    return Interval(estimate, low, high, confidence, method, n, resamples, seed)


def bootstrap_interval(
    statistic: IndexStatistic,
    n: int,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """The percentile bootstrap interval of `statistic` over n examples (the estimate is
    the statistic of all n). Resamples on which the statistic is undefined (nan, e.g. a
    correlation of constant predictions) are left out of the quantiles."""
    return _percentile_interval(statistic, n, confidence, resamples, seed, "bootstrap")


def paired_bootstrap_interval(
    statistic_a: IndexStatistic,
    statistic_b: IndexStatistic,
    n: int,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """The percentile bootstrap interval of `statistic_a - statistic_b`, both evaluated on
    the same resampled example indices in every draw (their examples must be the same,
    in the same order)."""

    def difference(idx: np.ndarray) -> np.ndarray:
        return np.asarray(statistic_a(idx), dtype=np.float64) - np.asarray(
            statistic_b(idx), dtype=np.float64
        )

    return _percentile_interval(difference, n, confidence, resamples, seed, "paired-bootstrap")


def paired_bootstrap_mean_interval(
    pairs: Sequence[tuple[IndexStatistic, IndexStatistic, int]],
    *,
    shared_examples: bool,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """The percentile bootstrap interval of the mean over `pairs` (one per seed: the two
    runs of that seed, scored on the same n examples) of `statistic_a - statistic_b`.

    `shared_examples`: every pair is scored on the same examples (one set of resampled
    indices serves all pairs, as the eval-set draw is common to them); otherwise each
    pair has its own eval examples and its indices are drawn independently (its own
    stream of `seed`). With one pair both are `paired_bootstrap_interval`."""
    _check_confidence(confidence)
    if not pairs:
        raise ValueError("paired_bootstrap_mean_interval needs at least one pair")
    if shared_examples:
        n = pairs[0][2]
        if any(p[2] != n for p in pairs):
            raise ValueError("pairs on shared examples must have the same number of examples")
        return paired_bootstrap_interval(
            averaged([a for a, _, _ in pairs]), averaged([b for _, b, _ in pairs]), n,
            confidence=confidence, resamples=resamples, seed=seed,
        )  # fmt: skip
    streams = np.random.SeedSequence(seed).spawn(len(pairs))
    dists, estimates = [], []
    for (a, b, n), stream in zip(pairs, streams, strict=True):

        def difference(idx: np.ndarray, a: IndexStatistic = a, b: IndexStatistic = b) -> np.ndarray:
            return np.asarray(a(idx), dtype=np.float64) - np.asarray(b(idx), dtype=np.float64)

        dists.append(bootstrap_distribution(difference, n, resamples, stream))
        estimates.append(_on_all(difference, n))
    return _from_distribution(
        float(np.mean(estimates)), np.mean(dists, axis=0), confidence,
        "paired-bootstrap-per-seed", pairs[0][2], resamples, seed,
    )  # fmt: skip


# ----------------------------------------------------------------------------- statistics


def mean_statistic(values: Sequence[float] | np.ndarray) -> IndexStatistic:
    """The mean of per-example `values` over the resampled examples (vectorised)."""
    v = np.asarray(values, dtype=np.float64)
    return lambda idx: v[idx].mean(axis=-1)


def per_row(fn: Callable[[np.ndarray], float]) -> IndexStatistic:
    """A statistic from a function of one index array (called once per resample)."""
    return lambda idx: np.array([fn(row) for row in np.atleast_2d(idx)], dtype=np.float64)


def averaged(statistics: Sequence[IndexStatistic]) -> IndexStatistic:
    """The mean of several runs' statistics on the same resampled examples (a seed
    group scored per resample as the mean over its seeds)."""
    if not statistics:
        raise ValueError("averaged() needs at least one statistic")
    return lambda idx: np.mean([np.asarray(s(idx), dtype=np.float64) for s in statistics], axis=0)


def _correlation(fn: Callable[..., Any], x: np.ndarray, y: np.ndarray) -> IndexStatistic:
    def one(idx: np.ndarray) -> float:
        a, b = x[idx], y[idx]
        if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
            return float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(a, b)[0])

    return per_row(one)


def mcc_statistic(labels: np.ndarray, preds: np.ndarray) -> IndexStatistic:
    """Matthews correlation (multi-class, as scikit-learn's `matthews_corrcoef`: 0 when
    either side is constant) of the resampled examples, from their confusion matrices."""
    k = int(max(labels.max(initial=0), preds.max(initial=0))) + 1
    codes = labels * k + preds

    def stat(idx: np.ndarray) -> np.ndarray:
        idx = np.atleast_2d(idx)
        rows = len(idx)
        flat = (codes[idx] + (np.arange(rows) * k * k)[:, None]).ravel()
        conf = np.bincount(flat, minlength=rows * k * k).reshape(rows, k, k).astype(np.float64)
        t_sum, p_sum = conf.sum(axis=2), conf.sum(axis=1)
        correct = np.trace(conf, axis1=1, axis2=2)
        n = p_sum.sum(axis=1)
        cov_yp = correct * n - (t_sum * p_sum).sum(axis=1)
        cov_pp = n**2 - (p_sum * p_sum).sum(axis=1)
        cov_yy = n**2 - (t_sum * t_sum).sum(axis=1)
        denom = cov_yy * cov_pp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denom == 0, 0.0, cov_yp / np.sqrt(denom))

    return stat


def bleu_statistic(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> IndexStatistic:
    """Corpus BLEU (0-100; sacrebleu, 13a tokens, lower-cased, every input against all of
    its references: what cotune reports as `bleu`) of the resampled inputs.

    The n-gram matching runs once per input (sacrebleu's per-sentence sufficient
    statistics: lengths, matches and totals of 1- to 4-grams); a resample sums the rows
    of its inputs and computes BLEU from the sums, as sacrebleu's own bootstrap does. On
    all inputs this equals `sacrebleu.corpus_bleu` of the corpus."""
    from sacrebleu.metrics import BLEU

    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"need one hypothesis per input: {len(hyps)} vs {len(refs)}")
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    metric = BLEU(lowercase=True, tokenize="13a")
    # sacrebleu skips None references (inputs with fewer references), as in `bleu()`
    stats = np.asarray(metric._extract_corpus_statistics(list(hyps), streams), dtype=np.int64)  # type: ignore[arg-type]

    def one(idx: np.ndarray) -> float:
        return float(metric._compute_score_from_stats(stats[idx].sum(axis=0).tolist()).score)

    return per_row(one)


def metric_statistic(
    metric: str,
    records: Sequence[dict[str, Any]],
    references: Sequence[Sequence[str]] | None = None,
) -> IndexStatistic:
    """The statistic of `metric` over resampled predictions.jsonl `records` (one split).

    `references` (each record's references, in order) are needed for `bleu`. Raises
    `ValueError` for a metric that cannot be recomputed per example (see the module doc).
    """
    if metric == "accuracy":
        if not records or "correct" not in records[0]:
            raise ValueError(f"{metric} needs classification predictions (with 'correct')")
        return mean_statistic([1.0 if r["correct"] else 0.0 for r in records])
    if metric == "mcc":
        y = np.asarray([r["label"] for r in records], dtype=np.int64)
        p = np.asarray([r["prediction"] for r in records], dtype=np.int64)
        return mcc_statistic(y, p)
    if metric in ("pearson", "spearman"):
        y = np.asarray([r["label"] for r in records], dtype=np.float64)
        p = np.asarray([r["prediction"] for r in records], dtype=np.float64)
        fn = scipy_stats.pearsonr if metric == "pearson" else scipy_stats.spearmanr
        return _correlation(fn, p, y)
    if metric in ("exact_match", "f1"):
        if not records or metric not in records[0] or "answers" not in records[0]:
            raise ValueError(
                f"{metric} per example needs extractive-QA predictions (with 'answers' and "
                f"'{metric}'); a classification f1 cannot be recomputed from predictions.jsonl"
            )
        return mean_statistic([float(r[metric]) for r in records])
    if metric == "bleu":
        if references is None or len(references) != len(records):
            raise ValueError("bleu needs every input's references (generations.jsonl)")
        return bleu_statistic([str(r["output"]) for r in records], references)
    raise ValueError(
        f"no per-example bootstrap for {metric!r}; supported: {', '.join(PER_EXAMPLE_METRICS)}"
    )
