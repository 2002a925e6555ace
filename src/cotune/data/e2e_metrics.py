"""The five E2E NLG metrics, multi-reference, from well-kept offline packages.

Following the official e2e-metrics (github.com/tuetschek/e2e-metrics): BLEU and NIST on
mteval-v13a tokens, case-insensitive; METEOR 1.5, ROUGE-L and CIDEr from the MS-COCO
caption evaluation code on Stanford PTB tokens (lower-cased, punctuation removed).

- BLEU: `sacrebleu` (13a tokenizer, lowercase; variable reference counts), 0-100;
- NIST: `nltk.translate.nist_score.corpus_nist` (n = 5) on the same 13a tokens;
- METEOR: `pycocoevalcap` (its bundled meteor-1.5.jar, `-l en -norm`; needs Java), 0-1;
- ROUGE-L: `pycocoevalcap` (beta 1.2), reported 0-100 like the E2E papers;
- CIDEr: `pycocoevalcap` (corpus IDF from the references).

The Java tools start once per process (METEOR loads its paraphrase table, which takes
tens of seconds on a busy machine) and are reused.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")

_meteor_lock = threading.Lock()
_meteor: Any = None


# the `gen` extra: metric -> the package that computes it
METRIC_PACKAGES = {"bleu": "sacrebleu", "nist": "nltk", "meteor": "pycocoevalcap",
                   "rouge_l": "pycocoevalcap", "cider": "pycocoevalcap"}  # fmt: skip


def check_metric_packages(metrics: Sequence[str] = METRICS) -> None:
    """A `UserError` naming the missing packages (and the extra that brings them) when
    one of `metrics` cannot be computed here; checked before a generation run trains."""
    import importlib.util

    missing = sorted(
        {METRIC_PACKAGES[m] for m in metrics if m in METRIC_PACKAGES}
        - {p for p in set(METRIC_PACKAGES.values()) if importlib.util.find_spec(p) is not None}
    )
    if missing:
        from cotune.errors import UserError

        raise UserError(
            f"generation tasks are scored with {', '.join(sorted(set(METRIC_PACKAGES.values())))}; "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'cotune[gen]' (make setup installs it)"
        )


def _check_java(metric: str) -> None:
    if shutil.which("java") is None:
        from cotune.errors import UserError

        raise UserError(
            f"the {metric} metric runs pycocoevalcap's Java tools, and no `java` is on PATH; "
            "install a Java runtime (e.g. openjdk 17) or leave it out of the metrics"
        )


@lru_cache(maxsize=1)
def _tok13a() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def mteval_tokens(text: str, lowercase: bool = True) -> list[str]:
    """mteval-v13a tokens (what BLEU and NIST count), lower-cased by default."""
    text = text.strip()
    return _tok13a()(text.lower() if lowercase else text).split()


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], lowercase: bool = True) -> float:
    """Corpus BLEU (0-100), every hypothesis against all of its references."""
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    # sacrebleu skips None references (inputs with fewer references) but annotates the
    # streams as Sequence[Sequence[str]]
    score = sacrebleu.corpus_bleu(list(hyps), streams, lowercase=lowercase, tokenize="13a")  # type: ignore[arg-type]
    return float(score.score)


def nist(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 5, lowercase: bool = True
) -> float:
    """Corpus NIST (information-weighted n-gram precision, n <= 5)."""
    from nltk.translate.nist_score import corpus_nist

    hyp_toks = [mteval_tokens(h, lowercase) for h in hyps]
    if not any(hyp_toks):
        return 0.0
    ref_toks = [[mteval_tokens(r, lowercase) for r in rs] for rs in refs]
    # an order no hypothesis reaches has no n-grams and adds nothing (mteval's reading);
    # nltk divides by their count, so it is left out here instead of raising
    n = min(n, max(len(t) for t in hyp_toks))
    return float(corpus_nist(ref_toks, hyp_toks, n=n))


def ptb_tokenize(
    hyps: Sequence[str], refs: Sequence[Sequence[str]]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """COCO-style inputs (`res`, `gts`) after Stanford PTB tokenization."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check_java("PTB tokenizer")
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    return res, gts


def meteor_score(res: dict[int, list[str]], gts: dict[int, list[str]]) -> float:
    """METEOR 1.5 through pycocoevalcap's jar (one JVM per process, reused)."""
    global _meteor
    from pycocoevalcap.meteor.meteor import Meteor

    _check_java("METEOR")
    with _meteor_lock:
        if _meteor is None:
            _meteor = Meteor()
        # An empty hypothesis would leave METEOR's line protocol waiting: score it as a
        # hypothesis that matches nothing instead (a token no reference contains).
        safe = {k: [v[0] if v[0].strip() else "\u2205"] for k, v in res.items()}
        score, _ = _meteor.compute_score(gts, safe)
    return float(score)


def e2e_scores(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], metrics: Sequence[str] = METRICS
) -> dict[str, float]:
    """The E2E metrics of `hyps` (one text per input) against `refs` (each input's
    references). `metrics` picks a subset of `METRICS`."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(METRICS)}")
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"need one hypothesis per input: {len(hyps)} vs {len(refs)}")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every input needs at least one reference")
    out: dict[str, float] = {}
    if "bleu" in metrics:
        out["bleu"] = bleu(hyps, refs)
    if "nist" in metrics:
        out["nist"] = nist(hyps, refs)
    coco = [m for m in ("meteor", "rouge_l", "cider") if m in metrics]
    if coco:
        res, gts = ptb_tokenize(hyps, refs)
        if "meteor" in coco:
            out["meteor"] = meteor_score(res, gts)
        if "rouge_l" in coco:
            from pycocoevalcap.rouge.rouge import Rouge

            out["rouge_l"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
        if "cider" in coco:
            from pycocoevalcap.cider.cider import Cider

            out["cider"] = float(Cider().compute_score(gts, res)[0])
    return {m: out[m] for m in metrics}
