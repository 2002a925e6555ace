"""`fedkd`: clients train LoRA like fedlora; on the server, a teacher trained on the server's public share, and mutual
distillation between it and the aggregated student adapter (FedKD).

Each round, after the student adapters are averaged:
1. the teacher trains on the public share with cross-entropy;
2. student and teacher distil into each other on the same share. Each side's loss is
   its own cross-entropy plus the KL divergence from the other side's
   temperature-scaled distribution (KL on log-softmax(logits / T), times T^2 so the
   gradient scale does not shrink with T), scaled by 1 / (CE_s + CE_t + 1) with both
   CE terms detached: the less either model has learned, the less they trust each other;
3. the distilled student adapter becomes the global state sent back to clients.
Clients never see the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cotune.config import Config
from cotune.config.schema import LoraConfig, ModelConfig
from cotune.data import EncodedDataset, PadCollator, encode
from cotune.errors import ConfigError
from cotune.methods.federated.client import local_train
from cotune.methods.federated.global_model import GlobalModel
from cotune.methods.federated.state import get_state, set_state
from cotune.methods.spec import FederatedSpec, MethodSpec, ServerHook, State, reject_task_kind
from cotune.training import (
    ModelStep,
    adapter_for,
    autocast,
    cycle,
    derive_seed,
    fit,
    make_optimizer,
    model_inputs,
    round_schedule,
    seed_everything,
    trainable_count,
)


@dataclass
class KDLosses:
    """The two sides' losses of one mutual-distillation step and their parts."""

    student: Tensor
    teacher: Tensor
    ce_student: Tensor
    ce_teacher: Tensor
    kl_student: Tensor  # KL(teacher || student): what the student learns from the teacher
    kl_teacher: Tensor  # KL(student || teacher)
    scale: Tensor


def mutual_distillation_losses(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    label_smoothing: float = 0.0,
) -> KDLosses:
    """Adaptive mutual distillation (FedKD): CE + KL / (CE_s + CE_t + 1) on each side."""
    t = float(temperature)
    ce_s = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    ce_t = F.cross_entropy(teacher_logits, labels, label_smoothing=label_smoothing)
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    # F.kl_div(input=log q, target=log p, log_target=True) = KL(p || q), averaged per example.
    kl_s = F.kl_div(log_p_s, log_p_t.detach(), log_target=True, reduction="batchmean") * t * t
    kl_t = F.kl_div(log_p_t, log_p_s.detach(), log_target=True, reduction="batchmean") * t * t
    scale = 1.0 / (ce_s.detach() + ce_t.detach() + 1.0)
    return KDLosses(
        student=ce_s + scale * kl_s,
        teacher=ce_t + scale * kl_t,
        ce_student=ce_s,
        ce_teacher=ce_t,
        kl_student=kl_s,
        kl_teacher=kl_t,
        scale=scale,
    )


class _Paired(Dataset):
    """Item i of the public share tokenised for the student and for the teacher."""

    def __init__(self, student: EncodedDataset, teacher: EncodedDataset) -> None:
        self.student, self.teacher = student, teacher

    def __len__(self) -> int:
        return len(self.student)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.student[i], self.teacher[i]


class _PairCollator:
    def __init__(self, student_pad: int, teacher_pad: int) -> None:
        self.student, self.teacher = PadCollator(student_pad), PadCollator(teacher_pad)

    def __call__(self, items: list[tuple[dict[str, Any], dict[str, Any]]]):  # type: ignore[no-untyped-def]
        return self.student([a for a, _ in items]), self.teacher([b for _, b in items])


def teacher_model_config(cfg: Config) -> ModelConfig:
    return ModelConfig(name=cfg.kd.teacher, lora=cfg.kd.teacher_lora, pooling=cfg.model.pooling)


def teacher_lr(cfg: Config) -> float:
    if cfg.kd.teacher_lr is not None:
        return cfg.kd.teacher_lr
    return 2e-3 if cfg.kd.teacher_lora is not None else 5e-5


class KDHook(ServerHook):
    """The server half of fedkd: owns the teacher, distils the student every round."""

    def __init__(self, cfg: Config, global_model: GlobalModel) -> None:
        if global_model.task.kind != "classification":
            raise ConfigError(
                f"fedkd distils class distributions; task {global_model.task.name!r} is a "
                f"{global_model.task.kind} task. Use fedlora or fedavg for it."
            )
        if not global_model.split.public:
            raise ConfigError("fedkd needs a public share: set kd.public_fraction above 0")
        self.cfg = cfg
        self.global_model = global_model
        self.student = global_model.model
        seed_everything(derive_seed(cfg.seed, "teacher-init"))
        task = global_model.task
        self.teacher_adapter = adapter_for(task, cfg)
        self.teacher, self.teacher_tokenizer = self.teacher_adapter.build_model(
            teacher_model_config(cfg)
        )
        t_tok = self.teacher_tokenizer
        public = [task.train[i] for i in global_model.split.public]
        s_tok = global_model.tokenizer
        self.public = _Paired(
            encode(public, s_tok, cfg.train.max_seq_len),
            encode(public, t_tok, cfg.train.max_seq_len),
        )
        self.collate = _PairCollator(s_tok.pad_token_id, t_tok.pad_token_id)
        n_batches = math.ceil(len(self.public) / cfg.train.batch_size)
        self.steps = cfg.kd.server_steps or max(1, math.ceil(cfg.kd.server_epochs * n_batches))
        self._metrics: dict[str, float] = {}

    @property
    def trainable(self) -> int:
        return trainable_count(self.teacher)

    def _loader(self, seed: int) -> DataLoader:
        g = torch.Generator()
        g.manual_seed(seed)
        return DataLoader(
            self.public,
            batch_size=self.cfg.train.batch_size,
            shuffle=True,
            generator=g,
            collate_fn=self.collate,
            num_workers=0,
        )

    def _train_teacher(self, server_round: int) -> float:
        cfg = self.cfg
        loader = self._loader(derive_seed(cfg.seed, "kd/teacher", server_round))
        opt = make_optimizer(self.teacher.parameters(), cfg, lr=teacher_lr(cfg))
        sched = round_schedule(opt, cfg.train, self.steps, cfg.federated.rounds, server_round)
        step = ModelStep(self.teacher, opt, sched, precision=cfg.train.precision,
                         max_grad_norm=cfg.train.max_grad_norm, measure=False)  # fmt: skip
        stats = fit(step, (t for _, t in cycle(loader)), self.steps, measure=False)
        return stats.mean_loss

    def _distil(self, server_round: int) -> dict[str, float]:
        cfg = self.cfg
        loader = cycle(self._loader(derive_seed(cfg.seed, "kd/distil", server_round)))
        s_opt = make_optimizer(self.student.parameters(), cfg)
        t_opt = make_optimizer(self.teacher.parameters(), cfg, lr=teacher_lr(cfg))
        scheds = [
            round_schedule(o, cfg.train, self.steps, cfg.federated.rounds, server_round)
            for o in (s_opt, t_opt)
        ]
        sums = {"kd_ce_student": 0.0, "kd_ce_teacher": 0.0, "kd_kl_student": 0.0,
                "kd_kl_teacher": 0.0, "kd_scale": 0.0}  # fmt: skip
        self.student.train()
        self.teacher.train()
        for _ in range(self.steps):
            s_batch, t_batch = next(loader)
            with autocast(cfg.train.precision):
                s_logits = self.student(**model_inputs(s_batch)).logits.float()
                t_logits = self.teacher(**model_inputs(t_batch)).logits.float()
            losses = mutual_distillation_losses(
                s_logits, t_logits, s_batch["labels"], cfg.kd.temperature,
                cfg.train.label_smoothing,
            )  # fmt: skip
            (losses.student + losses.teacher).backward()
            for model, opt, sched in (
                (self.student, s_opt, scheds[0]),
                (self.teacher, t_opt, scheds[1]),
            ):
                if cfg.train.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.train.max_grad_norm
                    )
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            sums["kd_ce_student"] += float(losses.ce_student)
            sums["kd_ce_teacher"] += float(losses.ce_teacher)
            sums["kd_kl_student"] += float(losses.kl_student)
            sums["kd_kl_teacher"] += float(losses.kl_teacher)
            sums["kd_scale"] += float(losses.scale)
        self.student.eval()
        self.teacher.eval()
        return {k: v / self.steps for k, v in sums.items()}

    def after_aggregate(self, server_round: int, state: State) -> State:
        seed_everything(derive_seed(self.cfg.seed, "kd", server_round))
        set_state(self.student, state)
        teacher_loss = self._train_teacher(server_round)
        metrics = self._distil(server_round)
        scores = self.teacher_adapter.evaluate(self.teacher, self.teacher_tokenizer).metrics
        self._metrics = {
            "teacher_train_loss": teacher_loss,
            **metrics,
            **{f"teacher_{k}": v for k, v in scores.items() if k != "loss"},
        }
        return get_state(self.student)

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> State:
        return get_state(self.teacher)

    def load_state_dict(self, state: State) -> None:
        set_state(self.teacher, state)


def configure(cfg: Config) -> None:
    reject_task_kind(cfg, ("qa", "image-classification"), "fedlora or fedavg for QA and images")
    if cfg.federated.client_data == "node":
        raise ConfigError(
            "fedkd's teacher trains on a public share of the training data, and with "
            "federated.client_data = 'node' (each node brings its own data: deployment to "
            "your SuperLink) the server holds no training data; use fedlora or fedavg"
        )
    if cfg.model.lora is None:  # the student trains LoRA (default r = 8)
        cfg.model.lora = LoraConfig()


SPEC = MethodSpec(
    name="fedkd",
    summary="federated LoRA plus mutual distillation with a server-side teacher",
    runs=FederatedSpec(
        client_train=local_train,
        server_hook=KDHook,
        public_fraction=lambda cfg: cfg.kd.public_fraction,
    ),
    reads=frozenset({"federated", "kd", "memory", "runtime"}),
    configure=configure,
)
