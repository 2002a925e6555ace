"""The inversion attack on one configuration (`attack_config`) or one finished split run
(`attack_run`, what `cotune attack RUN_DIR` calls); see `inversion` for the attacker."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cotune.attack.inversion import (
    CutRows,
    cut_rows,
    informative_tokens,
    majority_floor,
    recovery,
    train_inverter,
)
from cotune.config import Config, TaskConfig
from cotune.config.load import load_config
from cotune.data import load_task
from cotune.data.registry import IMAGE_KINDS
from cotune.errors import ConfigError, DataError
from cotune.link.codecs import make_codec
from cotune.models import build_classifier, load_tokenizer
from cotune.models.cut import cut_classifier
from cotune.privacy import clip_rows

DEVICE_FILE = "device_trainable.safetensors"
RESULT_FILE = "attack.json"
SPLIT_METHODS = ("split", "splitfed")


def sentences_of(texts: list[str], limit: int, seed: int) -> list[str]:
    """Sentences of the public articles (5+ words), a seeded sample of `limit`."""
    out = [s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", t)]
    out = [s for s in out if len(s.split()) >= 5]
    random.Random(seed).shuffle(out)
    return out[:limit]


def noise_fn(clip: float, std: float, seed: int):  # type: ignore[no-untyped-def]
    """`[privacy]`'s mechanism on rows: clip each to `clip`, add N(0, std^2) noise."""
    g = torch.Generator().manual_seed(seed)

    def noisy(rows: torch.Tensor) -> torch.Tensor:
        return clip_rows(rows, clip) + torch.randn(rows.shape, generator=g) * std

    return noisy


def device_segment(
    cfg: Config, num_labels: int, problem: str, state: dict[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """The device segment of `cfg`'s cut model (its codec's SFT projection included),
    from the pre-trained weights and `cfg.seed`, with `state` (the device's trained
    weights, by name) loaded when given."""
    model, _, _ = build_classifier(cfg.model, max(num_labels, 1), problem=problem,
                                   seed=cfg.seed)  # fmt: skip
    split = cut_classifier(model, cfg.split.cut, sft_rank=make_codec(cfg.link).sft_rank)
    if state:
        named = split.named_trainable([split.device])
        missing = [n for n in named if n not in state]
        if missing:
            raise DataError(
                f"the device's saved weights lack {missing[:3]}: not this run's model/cut"
            )
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state[n].to(p.dtype))
    return split.device


def attack_config(
    cfg: Config,
    *,
    device_state: dict[str, torch.Tensor] | None = None,
    noise_std: float = 0.0,
    examples: int = 500,
    public_sentences: int = 4000,
    steps: int = 1500,
    hidden: int = 0,
) -> dict[str, Any]:
    """Attack the cut of `cfg` (split method, text classification task): an inverter
    trained on public BBC News rows, scored on `examples` of the task's training
    examples as the device sends them (its segment with `device_state` loaded: the
    trained weights; None: the initial ones). `noise_std` > 0: `[privacy]`'s clipping
    to `cfg.privacy.clip` and Gaussian noise of that std on both."""
    if cfg.link.codec == "pca":
        raise ConfigError("the attack decodes rows without calibration: codec 'pca' is not covered")
    task = load_task(cfg.task, cfg.seed)
    if task.kind in IMAGE_KINDS or task.kind not in ("classification", "regression"):
        raise ConfigError(
            f"the inversion attack reads text classification tasks; {cfg.task.name!r} is "
            f"a {task.kind} task"
        )
    tokenizer = load_tokenizer(cfg.model.name)
    codec = make_codec(cfg.link)
    specials = list(tokenizer.all_special_ids)

    def segment(state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        return device_segment(cfg, task.num_labels, task.kind, state)

    public_task = load_task(TaskConfig(name="bbc-news"), cfg.seed)
    public_texts = sentences_of([e.text_a for e in public_task.train], public_sentences, cfg.seed)
    rng = random.Random(cfg.seed)
    chosen = rng.sample(range(len(task.train)), min(examples, len(task.train)))
    device_examples = [task.train[i] for i in chosen]
    device_texts = [e.text_a for e in device_examples]
    length = cfg.train.max_seq_len
    attacker_noise = noise_fn(cfg.privacy.clip, noise_std, 1) if noise_std > 0 else None
    device_noise = noise_fn(cfg.privacy.clip, noise_std, 2) if noise_std > 0 else None
    public = cut_rows(segment(None), codec, tokenizer, public_texts, max_length=length,
                      noise=attacker_noise, skip_ids=specials)  # fmt: skip
    sent = cut_rows(segment(device_state), codec, tokenizer, device_texts, max_length=length,
                    noise=device_noise, skip_ids=specials)  # fmt: skip
    result: dict[str, Any] = {
        "model": cfg.model.name, "task": cfg.task.name, "cut": cfg.split.cut,
        "codec": cfg.link.codec, "width": int(sent.rows.shape[1]),
        "noise_std": noise_std, "clip": cfg.privacy.clip if noise_std > 0 else None,
        "device_weights": "trained" if device_state else "initial",
        "public_rows": int(public.rows.shape[0]), "device_rows": int(sent.rows.shape[0]),
        "device_examples": len(device_texts),
    }  # fmt: skip
    top: list[int] = []
    if task.kind == "classification":
        per_example = [sent.ids[sent.example == i].tolist() for i in range(len(device_texts))]
        labels = [int(e.label) for e in device_examples]
        top = informative_tokens(per_example, labels, top=100, min_count=5)
        result["informative_tokens"] = tokenizer.convert_ids_to_tokens(top[:30])
    result.update(score(public, sent, steps=steps, hidden=hidden, seed=cfg.seed, informative=top))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}


def score(
    public: CutRows,
    sent: CutRows,
    *,
    steps: int,
    hidden: int = 0,
    seed: int = 0,
    informative: list[int] | None = None,
) -> dict[str, Any]:
    """Train the inverter on the `public` rows and score it on the rows the device
    `sent`: exact-token recovery, the floors (an untrained inverter; the most frequent
    public token everywhere), the fit on the public rows, and (given `informative`
    token ids) the recovery and majority floor on those tokens only (None: no such row)."""
    inverter = train_inverter(public, steps=steps, hidden=hidden, seed=seed)
    predicted = inverter.predict(sent.rows)
    untrained = train_inverter(public, steps=0, hidden=hidden, seed=seed).predict(sent.rows)
    out: dict[str, Any] = {
        "inverter": "mlp" if hidden else "linear", "inverter_hidden": hidden,
        "inverter_steps": steps, "attacker_vocab": int(inverter.vocab.numel()),
        "token_recovery": recovery(predicted, sent.ids),
        "floor_majority": majority_floor(public, sent),
        "floor_untrained": recovery(untrained, sent.ids),
        "public_fit": recovery(inverter.predict(public.rows), public.ids),
        # the share of the device's tokens the attacker's vocabulary holds: its ceiling
        "vocab_coverage": float(torch.isin(sent.ids, inverter.vocab).float().mean()),
    }  # fmt: skip
    if informative:
        out["informative_recovery"] = recovery(predicted, sent.ids, informative)
        out["informative_floor_majority"] = majority_floor(public, sent, informative)
        sel = torch.isin(sent.ids, torch.tensor(informative, dtype=torch.long))
        out["informative_rows"] = int(sel.sum())
        out["informative_coverage"] = (
            float(torch.isin(sent.ids[sel], inverter.vocab).float().mean()) if sel.any() else None
        )
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def attack_run(
    run_dir: str | Path, *, before: bool = False, out: str | Path | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`attack_config` on a finished split run: its config, its device's trained
    weights (`before`: the initial ones) and its noise; writes RUN_DIR/attack.json."""
    run = Path(run_dir)
    if not (run / "config.toml").is_file():
        raise DataError(f"{run} is not a run folder (no config.toml)")
    cfg = load_config(run / "config.toml")
    if cfg.method not in SPLIT_METHODS or cfg.method == "splitfed":
        raise ConfigError(
            f"cotune attack inverts a split run's cut; {run} is a {cfg.method!r} run "
            "(valid: method = 'split' on a text classification task)"
        )
    state = None
    if not before:
        if not (run / DEVICE_FILE).is_file():
            raise DataError(f"{run} has no {DEVICE_FILE}: unfinished run? (or use --before)")
        state = load_file(str(run / DEVICE_FILE))
    noise_std = 0.0
    summary = run / "summary.json"
    if cfg.privacy.epsilon is not None and summary.is_file():
        noise_std = float(json.loads(summary.read_text()).get("privacy", {}).get("noise_std", 0.0))
    result = attack_config(cfg, device_state=state, noise_std=noise_std, **kwargs)
    target = Path(out) if out is not None else run / RESULT_FILE
    target.write_text(json.dumps(result, indent=2) + "\n")
    return result
