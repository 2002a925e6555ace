"""Shared machinery every method trains with: the loop (`fit` over a step function),
optimiser and LR schedule, seeds, evaluation, and task adapters chosen by task kind.

Methods build on this package; it knows nothing of methods, transports or processes.
"""

from cotune.training.evaluation import EvalResult, evaluate
from cotune.training.loop import (
    Checkpoints,
    ModelStep,
    Recorder,
    Step,
    StepStats,
    autocast,
    count_tokens,
    cycle,
    fit,
    model_inputs,
    train_step,
    trainable_count,
)
from cotune.training.optim import (
    lr_factor,
    make_optimizer,
    make_schedule,
    round_schedule,
    total_steps,
)
from cotune.training.seeding import derive_seed, seed_everything, set_threads
from cotune.training.tasks import Evaluation, TaskAdapter, adapter_for

__all__ = [
    "Checkpoints",
    "EvalResult",
    "Evaluation",
    "ModelStep",
    "Recorder",
    "Step",
    "StepStats",
    "TaskAdapter",
    "adapter_for",
    "autocast",
    "count_tokens",
    "cycle",
    "derive_seed",
    "evaluate",
    "fit",
    "lr_factor",
    "make_optimizer",
    "make_schedule",
    "model_inputs",
    "round_schedule",
    "seed_everything",
    "set_threads",
    "total_steps",
    "train_step",
    "trainable_count",
]
