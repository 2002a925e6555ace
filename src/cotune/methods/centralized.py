"""`centralized`: the reference every other method is compared with.

The whole model trains in one place on all the data (full fine-tuning or LoRA), on any
task kind: the task adapter gives the model (a classifier, or a causal LM for
generation), the batches and the evaluation.
"""

from __future__ import annotations

from pathlib import Path

from cotune.config import Config
from cotune.data import load_task
from cotune.memory import apply_memory_option
from cotune.methods.spec import LocalSpec, MethodResult, MethodSpec
from cotune.models.base_dtype import weight_bytes
from cotune.training import (
    Checkpoints,
    ModelStep,
    Recorder,
    StepStats,
    adapter_for,
    cycle,
    fit,
    make_optimizer,
    make_schedule,
    seed_everything,
    set_threads,
    total_steps,
    trainable_count,
)
from cotune.training.placement import cloud_device, compute_device_summary, place
from cotune.training.resume import LocalResume, remove_local
from cotune.training.tasks import Evaluation


def train(
    cfg: Config, recorder: Recorder, run_dir: Path | None = None, resume: bool = False
) -> MethodResult:
    """Train and score; with a run folder, checkpoint every `runtime.checkpoint_minutes`
    (with `runtime.checkpoint`), and with `resume` continue from its checkpoint."""
    seed_everything(cfg.seed)
    set_threads(cfg.train)
    task = load_task(cfg.task, cfg.seed)
    adapter = adapter_for(task, cfg)
    device = cloud_device(cfg.runtime.device, cfg.memory.backward)
    model, tokenizer = adapter.build_model()
    apply_memory_option(model, cfg.memory)
    place(model, device)
    loader = adapter.loader(adapter.encode(task.train, tokenizer), tokenizer, shuffle=True,
                            seed=cfg.seed)  # fmt: skip
    n_steps = total_steps(cfg.train, len(loader))
    optimizer = make_optimizer(model.parameters(), cfg)
    schedule = make_schedule(optimizer, n_steps, cfg.train)
    step = ModelStep(model, optimizer, schedule, precision=cfg.train.precision,
                     max_grad_norm=cfg.train.max_grad_norm)  # fmt: skip
    outputs: dict[str, list[str]] = {}
    last: list[Evaluation] = []  # the latest evaluation (the final one after `fit`)

    def evaluate() -> dict[str, float]:
        result = adapter.evaluate(model, tokenizer)
        outputs.update(result.outputs)
        last[:] = [result]
        return result.metrics

    checkpoints = Checkpoints(recorder, n_steps, cfg.train.eval_every, evaluate,
                              lr=lambda: float(schedule.get_last_lr()[0]))  # fmt: skip
    saver = (
        LocalResume(run_dir, model, optimizer, schedule, 60 * cfg.runtime.checkpoint_minutes)
        if run_dir is not None and cfg.runtime.checkpoint
        else None
    )
    batches = cycle(loader)
    start = saver.restore() if saver is not None and resume else None
    if saver is not None and start is not None:  # continue after the checkpoint's step
        saver.skip(batches, start.steps)
        saver.restore_rng()
        checkpoints.since_eval = saver.since_eval

    def on_step(done: int, loss: float, stats: StepStats) -> None:
        checkpoints(done, loss, stats)
        if saver is not None and done < n_steps:
            saver.maybe_save(done, stats, checkpoints.since_eval)

    stats = fit(step, batches, n_steps, on_step=on_step, stats=start,
                breakdown_memory=cfg.memory.report, progress=f"{cfg.method} {task.name}")  # fmt: skip
    if run_dir is not None:
        remove_local(run_dir)
    if n_steps == 0:  # train.steps = 0: the model as built, scored once (a baseline)
        checkpoints.evaluate_now(0)
    if run_dir is not None and outputs:
        adapter.save_outputs(run_dir, Evaluation(checkpoints.last, outputs))
    trainable = {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    return MethodResult(
        metrics=dict(checkpoints.last),
        device_peak_bytes=stats.peak_rss_bytes,
        saved_activation_bytes=stats.saved_activation_bytes,
        trainable_device=trainable_count(model),
        trainable_cloud=0,
        extra={
            **stats.summary(),
            "device_weight_bytes": weight_bytes(model),
            **compute_device_summary(device),
        },  # fmt: skip
        saved={"trainable.safetensors": trainable},
        predictions=last[0].predictions if last else [],
    )


SPEC = MethodSpec(
    name="centralized",
    summary="the whole model trained in one place on all the data (the reference)",
    runs=LocalSpec(train=train, resumable=True),
    reads=frozenset({"generation", "memory", "runtime"}),
)
