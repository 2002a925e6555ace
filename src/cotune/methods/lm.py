"""What causal-LM fine-tuning on a generation task (e.g. `e2e`) needs, for every method.

- `encode_pairs`: prompt + target tokenised once; labels are the target tokens only
  (prompt positions are -100), the target ends with EOS; no padding.
- `LMCollator`: dynamic padding to the batch's longest row (right padding), so only
  real tokens are computed on and, in split methods, only real tokens cross the link.
- `completion_loss`: next-token cross-entropy over completion tokens only, with label
  smoothing; `CompletionLM` wraps a (peft) causal LM so that `model(input_ids,
  attention_mask, labels=...)` returns `.loss` and `.logits` like the classifiers, and
  the shared `fit` loop trains it unchanged.
- `generate_texts` / `evaluate_generation`: beam search (beam, length penalty, no
  repeated n-grams, max new tokens from `[generation]`) and the task's metrics.
- `run_centralized`: the `centralized` method on a generation task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cotune.config import Config
from cotune.data.task import Example

IGNORE = -100
PROMPT_SUFFIX = " ||"  # "MR ||" then " reference<eos>", as in the microsoft/LoRA E2E format


def is_generation(task: Any) -> bool:
    return getattr(task, "kind", None) == "generation"


# ----------------------------------------------------------------------------- data


def eos_id(tokenizer: Any) -> int:
    """The id that ends a target (EOS, else SEP for WordPiece tokenizers)."""
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither an EOS nor a SEP token to end targets with")


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])


class PairDataset(Dataset):
    """Tokenised (prompt, target) pairs: item i is {"input_ids", "labels"} (unpadded)."""

    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]

    def subset(self, indices: list[int]) -> PairDataset:
        return PairDataset([self.items[i] for i in indices])


def encode_pairs(examples: list[Example], tokenizer: Any, max_len: int) -> PairDataset:
    """Prompt (`text_a`) + target (`text_b`) + EOS, truncated to `max_len` tokens
    (the target is cut first; the prompt keeps at most `max_len // 2`)."""
    end = eos_id(tokenizer)
    prompts = [ex.text_a + PROMPT_SUFFIX for ex in examples]
    targets = [" " + (ex.text_b or "") for ex in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    items = []
    for p, t in zip(p_ids, t_ids, strict=True):
        p = list(p)[: max(max_len // 2, 1)]
        t = (list(t) + [end])[: max_len - len(p)]
        items.append({"input_ids": p + t, "labels": [IGNORE] * len(p) + t})
    return PairDataset(items)


class LMCollator:
    """Right-pad a batch to its longest row: input_ids with `pad_token_id`, labels with
    -100, attention_mask 1 on real tokens."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[row, :k] = torch.as_tensor(f["input_ids"])
            labels[row, :k] = torch.as_tensor(f["labels"])
            mask[row, :k] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_lm_loader(
    ds: Dataset, batch_size: int, shuffle: bool, seed: int, pad_token_id: int
) -> DataLoader:
    """A single-process loader whose order is fixed by `seed`."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=LMCollator(pad_token_id),
        num_workers=0,
    )


# ----------------------------------------------------------------------------- model


@dataclass
class LMOutput:
    loss: Tensor | None
    logits: Tensor


def completion_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (logits at
    position t predict the token at t + 1), with label smoothing."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    gold = labels[:, 1:].reshape(-1)
    return nn.functional.cross_entropy(
        pred, gold, ignore_index=IGNORE, label_smoothing=label_smoothing
    )


class CompletionLM(nn.Module):
    """A causal LM (peft-wrapped or not) whose loss is `completion_loss`."""

    def __init__(self, lm: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.lm = lm
        self.label_smoothing = label_smoothing

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> LMOutput:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = None if labels is None else completion_loss(logits, labels, self.label_smoothing)
        return LMOutput(loss=loss, logits=logits)


def build_lm(cfg: Config) -> tuple[CompletionLM, Any, str]:
    """(model, tokenizer, family) for `cfg.model`: the causal LM with LoRA when
    `model.lora` is set (LoRA initialised from `cfg.seed`, so every party that builds
    it gets the same weights), in eval mode."""
    from cotune.models import apply_lora, load_causal_lm, load_tokenizer, resolve

    source = resolve(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model.name)
    # Building draws from torch's global RNG (tiny random weights, LoRA init): hold the
    # lock the split methods' private RNG streams take, so threads (splitfed's simulated
    # devices) neither build at once nor swap RNG states mid-build.
    from cotune.methods.split.common import _RNG_LOCK

    with _RNG_LOCK:
        lm = load_causal_lm(cfg.model.name, seed=cfg.seed)
        if cfg.model.lora is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                lm = apply_lora(lm, cfg.model.lora, source.family)
    model = CompletionLM(lm, cfg.train.label_smoothing)
    model.eval()
    return model, tokenizer, source.family


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_texts(lm: nn.Module, tokenizer: Any, prompts: list[str], cfg: Config) -> list[str]:
    """Beam-search completions of `prompts` (left-padded batches of
    `generation.batch_size`), decoded without special tokens."""
    gen = cfg.generation
    pad = int(tokenizer.pad_token_id)
    end = eos_id(tokenizer)
    was = lm.training
    lm.eval()
    out: list[str] = []
    for start in range(0, len(prompts), gen.batch_size):
        ids = [prompt_ids(tokenizer, p) for p in prompts[start : start + gen.batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x) :] = torch.as_tensor(x)
            mask[row, width - len(x) :] = 1
        seqs = lm.generate(
            input_ids=input_ids,
            attention_mask=mask,
            num_beams=gen.num_beams,
            length_penalty=gen.length_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size,
            max_new_tokens=gen.max_new_tokens,
            early_stopping=True,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=pad,
        )
        for row in seqs[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    lm.train(was)
    return out


def evaluate_generation(
    lm: nn.Module, tokenizer: Any, task: Any, cfg: Config
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Generate for every eval input of `task` and score with its metrics; returns
    (metrics, generated texts per split)."""
    from cotune.data.e2e_metrics import e2e_scores

    metrics: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    for split, examples in task.eval.items():
        hyps = generate_texts(lm, tokenizer, [ex.text_a for ex in examples], cfg)
        texts[split] = hyps
        metrics.update(e2e_scores(hyps, task.references[split], cfg.generation.metrics))
    return metrics, texts


def generation_model(model: nn.Module) -> nn.Module:
    """The module with `.generate` inside a `CompletionLM`."""
    return model.lm if isinstance(model, CompletionLM) else model


# ----------------------------------------------------------------------------- centralized


def run_centralized(cfg: Config, recorder: Any, run_dir: Any = None) -> Any:
    """`centralized` on a generation task: the whole causal LM (LoRA or full) trains in
    one place on all the data; evaluation by beam search and the task's metrics."""
    from cotune.data import load_task
    from cotune.memory import apply_memory_option
    from cotune.methods.loop import StepStats, fit
    from cotune.methods.result import MethodResult
    from cotune.methods.training import (
        cycle,
        make_optimizer,
        make_schedule,
        seed_everything,
        set_threads,
        total_steps,
        trainable_count,
    )

    seed_everything(cfg.seed)
    set_threads(cfg.train)
    task = load_task(cfg.task, cfg.seed)
    model, tokenizer, _ = build_lm(cfg)
    apply_memory_option(model, cfg.memory)
    loader = make_lm_loader(
        encode_pairs(task.train, tokenizer, cfg.train.max_seq_len),
        cfg.train.batch_size,
        shuffle=True,
        seed=cfg.seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    n_steps = total_steps(cfg.train, len(loader))
    optimizer = make_optimizer(model.parameters(), cfg)
    schedule = make_schedule(optimizer, n_steps, cfg.train)
    eval_every = cfg.train.eval_every or n_steps
    t_start = time.perf_counter()
    since_eval: list[float] = []
    last: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}

    def on_step(step: int, loss: float, stats: StepStats) -> None:
        since_eval.append(loss)
        if step % 10 == 0 or step == n_steps:
            recorder.log_train(
                {"step": step, "loss": sum(stats.losses[-10:]) / len(stats.losses[-10:]),
                 "lr": schedule.get_last_lr()[0]}
            )  # fmt: skip
        if step % eval_every == 0 or step == n_steps:
            metrics, texts = evaluate_generation(generation_model(model), tokenizer, task, cfg)
            outputs.update(texts)
            last.clear()
            last.update(metrics)
            recorder.log_eval(
                {"step": step, **metrics, "train_loss": sum(since_eval) / len(since_eval),
                 "bytes_up": 0, "bytes_down": 0, "wall_s": time.perf_counter() - t_start}
            )  # fmt: skip
            since_eval.clear()

    stats = fit(
        model, cycle(loader), n_steps, optimizer, schedule,
        precision=cfg.train.precision, max_grad_norm=cfg.train.max_grad_norm,
        on_step=on_step, progress=f"{cfg.method} {task.name}",
    )  # fmt: skip
    if run_dir is not None:
        trainable = {
            n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad
        }
        save_file(trainable, str(run_dir / "trainable.safetensors"))
        write_outputs(run_dir, task, outputs)
    return MethodResult(
        metrics=dict(last),
        device_peak_bytes=stats.peak_rss_bytes,
        saved_activation_bytes=stats.saved_activation_bytes,
        trainable_device=trainable_count(model),
        trainable_cloud=0,
        extra={
            "steps": stats.steps,
            "examples_seen": stats.examples,
            "tokens_per_s": stats.tokens / max(stats.train_s, 1e-9),
            "train_s": stats.train_s,
            "final_train_loss": stats.mean_loss,
        },
    )


def write_outputs(run_dir: Any, task: Any, outputs: dict[str, list[str]]) -> None:
    """The generated texts, one JSON line per input: {"split", "prompt", "output", "refs"}."""
    import json
    from pathlib import Path

    with open(Path(run_dir) / "generations.jsonl", "w", encoding="utf-8") as f:
        for split, hyps in outputs.items():
            for ex, hyp, refs in zip(task.eval[split], hyps, task.references[split], strict=True):
                rec = {"split": split, "prompt": ex.text_a, "output": hyp, "refs": refs}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
