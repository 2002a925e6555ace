"""`fedkd`: clients train LoRA like fedlora; on the server, a teacher trained on the server's public share, and mutual
distillation between it and the aggregated student adapter (FedKD).

Each round, after the student adapters are averaged:
1. the teacher trains on the public share with its task loss;
2. student and teacher distil into each other on the same share. Each side's loss is
   its own task loss (cross-entropy) plus the KL divergence from the other side's
   temperature-scaled distribution (KL on log-softmax(logits / T), times T^2 so the
   gradient scale does not shrink with T), scaled by 1 / (CE_s + CE_t + 1) with both
   CE terms detached: the less either model has learned, the less they trust each other;
3. the distilled student adapter becomes the global state sent back to clients.
Clients never see the teacher.

The distributions come from the task adapter (`TaskAdapter.distributions`): the class
distribution of each example (text classification, images), or the start and the end
distribution over each window's tokens (extractive QA; the KL is the mean of the two,
padding excluded, as the span loss is the mean of the two cross-entropies). Per-token
distributions need a teacher that tokenises exactly as the student does.
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
from cotune.data.registry import task_modality
from cotune.errors import ConfigError, UserError
from cotune.methods.federated.client import local_train
from cotune.methods.federated.global_model import GlobalModel
from cotune.methods.federated.state import get_state, set_state
from cotune.methods.spec import FederatedSpec, MethodSpec, ServerHook, State, reject_task_kind
from cotune.training import (
    ModelStep,
    TaskAdapter,
    adapter_for,
    autocast,
    cycle,
    derive_seed,
    fit,
    make_optimizer,
    round_schedule,
    seed_everything,
    trainable_count,
)
from cotune.training.placement import device_of, place, to_device
from cotune.training.tasks import Collator, Distribution, Encoded

# the teacher when `kd.teacher` is not set, by the task's modality
DEFAULT_TEACHER = {"text": "minilm", "image": "dinov2-small"}
# logit of a non-candidate entry (padding) after temperature scaling: exp() is 0 in fp32
_MASKED = -1e4


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


def _log_probs(d: Distribution, t: float) -> Tensor:
    x = d.logits.float() / t
    if d.mask is not None:
        x = x.masked_fill(~d.mask, _MASKED)
    return F.log_softmax(x, dim=-1)


def distillation_losses(
    ce_student: Tensor,
    ce_teacher: Tensor,
    student: list[Distribution],
    teacher: list[Distribution],
    temperature: float,
) -> KDLosses:
    """Adaptive mutual distillation (FedKD) from each side's task loss (CE) and its
    distributions: CE + KL / (CE_s + CE_t + 1) on each side, the KL averaged over the
    distributions (each one per row, averaged over rows; masked entries carry no
    probability on either side)."""
    t = float(temperature)
    if len(student) != len(teacher) or not student:
        raise ValueError("student and teacher must give the same, non-empty distributions")
    kl_s, kl_t = [], []
    for s, te in zip(student, teacher, strict=True):
        if s.logits.shape != te.logits.shape:
            raise ValueError(
                f"student and teacher distributions differ in shape: {tuple(s.logits.shape)} "
                f"vs {tuple(te.logits.shape)}"
            )
        log_p_s, log_p_t = _log_probs(s, t), _log_probs(te, t)
        # F.kl_div(input=log q, target=log p, log_target=True) = KL(p || q); "batchmean"
        # sums over the last dimension (and tokens) and averages over the batch's rows.
        kl_s.append(F.kl_div(log_p_s, log_p_t.detach(), log_target=True, reduction="batchmean"))
        kl_t.append(F.kl_div(log_p_t, log_p_s.detach(), log_target=True, reduction="batchmean"))
    kl_student = torch.stack(kl_s).mean() * t * t
    kl_teacher = torch.stack(kl_t).mean() * t * t
    scale = 1.0 / (ce_student.detach() + ce_teacher.detach() + 1.0)
    return KDLosses(
        student=ce_student + scale * kl_student,
        teacher=ce_teacher + scale * kl_teacher,
        ce_student=ce_student,
        ce_teacher=ce_teacher,
        kl_student=kl_student,
        kl_teacher=kl_teacher,
        scale=scale,
    )


def mutual_distillation_losses(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    label_smoothing: float = 0.0,
) -> KDLosses:
    """`distillation_losses` of two classifiers' logits (batch, classes) and labels."""
    ce_s = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    ce_t = F.cross_entropy(teacher_logits, labels, label_smoothing=label_smoothing)
    return distillation_losses(
        ce_s, ce_t, [Distribution(student_logits)], [Distribution(teacher_logits)], temperature
    )


class _Paired(Dataset):
    """Item i of the public share encoded for the student and for the teacher."""

    def __init__(self, student: Encoded, teacher: Encoded) -> None:
        if len(student) != len(teacher):
            raise ValueError(f"{len(student)} student items vs {len(teacher)} teacher items")
        self.student, self.teacher = student, teacher

    def __len__(self) -> int:
        return len(self.student)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.student[i], self.teacher[i]


class _PairCollator:
    def __init__(self, student: Collator, teacher: Collator) -> None:
        self.student, self.teacher = student, teacher

    def __call__(self, items: list[tuple[dict[str, Any], dict[str, Any]]]):  # type: ignore[no-untyped-def]
        return self.student([a for a, _ in items]), self.teacher([b for _, b in items])


def teacher_model_config(cfg: Config) -> ModelConfig:
    assert cfg.kd.teacher is not None, "fedkd's configure fills it in"
    return ModelConfig(name=cfg.kd.teacher, lora=cfg.kd.teacher_lora, pooling=cfg.model.pooling)


def _same_tokens(student: Encoded, teacher: Encoded) -> bool:
    """Whether two encodings of the same examples are the same items token for token."""
    if len(student) != len(teacher):
        return False
    return all(
        list(student[i]["input_ids"]) == list(teacher[i]["input_ids"]) for i in range(len(student))
    )


def teacher_lr(cfg: Config) -> float:
    if cfg.kd.teacher_lr is not None:
        return cfg.kd.teacher_lr
    return 2e-3 if cfg.kd.teacher_lora is not None else 5e-5


class KDHook(ServerHook):
    """The server half of fedkd: owns the teacher, distils the student every round."""

    def __init__(self, cfg: Config, global_model: GlobalModel) -> None:
        if not global_model.split.public:
            raise ConfigError("fedkd needs a public share: set kd.public_fraction above 0")
        self.cfg = cfg
        self.global_model = global_model
        self.student = global_model.model
        self.adapter: TaskAdapter = global_model.adapter
        seed_everything(derive_seed(cfg.seed, "teacher-init"))
        task = global_model.task
        teacher_cfg = cfg.model_copy(update={"model": teacher_model_config(cfg)})
        try:  # the teacher's own adapter checks that it suits the task (e.g. image size)
            self.teacher_adapter: TaskAdapter = adapter_for(task, teacher_cfg)
            self.teacher, self.teacher_tokenizer = self.teacher_adapter.build_model()
            place(self.teacher, device_of(self.student))  # the server's device
        except UserError as err:
            raise ConfigError(f"kd.teacher = {cfg.kd.teacher!r}: {err}") from None
        t_tok = self.teacher_tokenizer
        public = [task.train[i] for i in global_model.split.public]
        s_tok = global_model.tokenizer
        student_ds = self.adapter.encode(public, s_tok)
        teacher_ds = self.teacher_adapter.encode(public, t_tok)
        if self.adapter.token_level and not _same_tokens(student_ds, teacher_ds):
            raise ConfigError(
                f"fedkd on {task.kind} task {task.name!r} distils per-token distributions, "
                f"so the teacher must tokenise exactly as the student: kd.teacher = "
                f"{cfg.kd.teacher!r} does not tokenise as model.name = {cfg.model.name!r} "
                "does; choose a teacher with the student's tokenizer"
            )
        self.public = _Paired(student_ds, teacher_ds)
        self.collate = _PairCollator(
            self.adapter.collator(s_tok), self.teacher_adapter.collator(t_tok)
        )
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
            device = device_of(self.student)
            s_batch, t_batch = to_device(s_batch, device), to_device(t_batch, device)
            with autocast(cfg.train.precision, device.type):
                s_out, t_out = self.student(**s_batch), self.teacher(**t_batch)
            losses = distillation_losses(
                s_out.loss.float(), t_out.loss.float(),
                self.adapter.distributions(s_out, s_batch),
                self.teacher_adapter.distributions(t_out, t_batch), cfg.kd.temperature,
            )  # fmt: skip
            (losses.student + losses.teacher).backward()
            for model, opt, sched in (
                (self.student, s_opt, scheds[0]),
                (self.teacher, t_opt, scheds[1]),
            ):
                if cfg.train.max_grad_norm:  # 0: no clipping
                    nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.train.max_grad_norm
                    )
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            sums["kd_ce_student"] += losses.ce_student.item()
            sums["kd_ce_teacher"] += losses.ce_teacher.item()
            sums["kd_kl_student"] += losses.kl_student.item()
            sums["kd_kl_teacher"] += losses.kl_teacher.item()
            sums["kd_scale"] += losses.scale.item()
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
    reject_task_kind(cfg, ("regression", "generation"), "fedlora or fedavg for it")
    if cfg.federated.client_data == "node":
        raise ConfigError(
            "fedkd's teacher trains on a public share of the training data, and with "
            "federated.client_data = 'node' (each node brings its own data: deployment to "
            "your SuperLink) the server holds no training data; use fedlora or fedavg"
        )
    if cfg.kd.teacher is None:
        try:
            modality = task_modality(cfg.task.name)
        except ConfigError:  # an unknown task: load_task reports it
            modality = "text"
        cfg.kd.teacher = DEFAULT_TEACHER[modality]
    if cfg.model.lora is None:  # the student trains LoRA (default r = 8)
        cfg.model.lora = LoraConfig()


SPEC = MethodSpec(
    name="fedkd",
    summary="federated LoRA plus mutual distillation with a server-side teacher",
    runs=FederatedSpec(
        client_train=local_train,
        server_hook=KDHook,
        public_fraction=lambda cfg: cfg.kd.public_fraction,
        differential_privacy=True,
    ),
    reads=frozenset({"federated", "kd", "link", "memory", "privacy", "runtime"}),
    configure=configure,
)
