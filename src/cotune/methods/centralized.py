"""`centralized`: the reference every other method is compared with. The whole model
trains in one place on all the data (full fine-tuning or LoRA)."""

from __future__ import annotations

import time

from safetensors.torch import save_file

from cotune.config import Config
from cotune.data import encode, load_task, make_loader
from cotune.memory import apply_memory_option
from cotune.methods.loop import StepStats, fit
from cotune.methods.result import MethodResult, Recorder
from cotune.methods.training import (
    cycle,
    evaluate,
    make_optimizer,
    make_schedule,
    seed_everything,
    set_threads,
    total_steps,
    trainable_count,
)
from cotune.models import build_classifier


def eval_loaders(task, tokenizer, cfg: Config) -> dict:  # type: ignore[no-untyped-def]
    pad = tokenizer.pad_token_id
    return {
        split: make_loader(
            encode(examples, tokenizer, cfg.train.max_seq_len),
            cfg.train.eval_batch_size,
            shuffle=False,
            seed=cfg.seed,
            pad_token_id=pad,
        )
        for split, examples in task.eval.items()
    }


def run(cfg: Config, recorder: Recorder, run_dir=None) -> MethodResult:  # type: ignore[no-untyped-def]
    from cotune.data import canonical_name

    if canonical_name(cfg.task.name) == "e2e":  # generation: causal LM, beam-search eval
        from cotune.methods.lm import run_centralized

        return run_centralized(cfg, recorder, run_dir)
    seed_everything(cfg.seed)
    set_threads(cfg.train)
    task = load_task(cfg.task, cfg.seed)
    model, tokenizer, _ = build_classifier(
        cfg.model,
        task.num_labels,
        problem=task.kind,
        label_smoothing=cfg.train.label_smoothing,
        seed=cfg.seed,
    )
    apply_memory_option(model, cfg.memory)
    train_loader = make_loader(
        encode(task.train, tokenizer, cfg.train.max_seq_len),
        cfg.train.batch_size,
        shuffle=True,
        seed=cfg.seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    evals = eval_loaders(task, tokenizer, cfg)
    n_steps = total_steps(cfg.train, len(train_loader))
    optimizer = make_optimizer(model.parameters(), cfg)
    schedule = make_schedule(optimizer, n_steps, cfg.train)
    eval_every = cfg.train.eval_every or n_steps
    t_start = time.perf_counter()
    since_eval: list[float] = []
    last: dict[str, float] = {}

    def on_step(step: int, loss: float, stats: StepStats) -> None:
        since_eval.append(loss)
        if step % 10 == 0 or step == n_steps:
            recorder.log_train(
                {
                    "step": step,
                    "loss": sum(stats.losses[-10:]) / len(stats.losses[-10:]),
                    "lr": schedule.get_last_lr()[0],
                    "tokens_per_s": stats.tokens / max(stats.train_s, 1e-9),
                }
            )
        if step % eval_every == 0 or step == n_steps:
            result = evaluate(model, task, evals, cfg.train.precision)
            last.clear()
            last.update(result.metrics, loss=result.loss)
            recorder.log_eval(
                {
                    "step": step,
                    **result.metrics,
                    "loss": result.loss,
                    "train_loss": sum(since_eval) / len(since_eval),
                    "bytes_up": 0,
                    "bytes_down": 0,
                    "wall_s": time.perf_counter() - t_start,
                }
            )
            since_eval.clear()

    stats = fit(
        model,
        cycle(train_loader),
        n_steps,
        optimizer,
        schedule,
        precision=cfg.train.precision,
        max_grad_norm=cfg.train.max_grad_norm,
        on_step=on_step,
        progress=f"{cfg.method} {task.name}",
    )
    if run_dir is not None:
        trainable = {
            n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad
        }
        save_file(trainable, str(run_dir / "trainable.safetensors"))
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
