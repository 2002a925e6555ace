"""The typed config schema: every section and key of a cotune config, with defaults.

Every key has a default, so a config names only what it changes. Unknown keys are
errors. Which method-specific rules apply and which optional sections a method reads
is declared by the method itself (`cotune.methods`); sections it does not read draw a
warning (see `unused_sections`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

MemoryOp = Literal["linear", "matmul", "softmax", "layernorm", "activation"]
MEMORY_OPS: tuple[MemoryOp, ...] = ("linear", "matmul", "softmax", "layernorm", "activation")
GenerationMetric = Literal["bleu", "nist", "meteor", "rouge_l", "cider"]
GENERATION_METRICS: tuple[GenerationMetric, ...] = ("bleu", "nist", "meteor", "rouge_l", "cider")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    name: str = "bbc-news"
    data_dir: str | None = None
    max_train_examples: int | None = Field(default=None, ge=1)
    max_eval_examples: int | None = Field(default=None, ge=1)
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # tasks with no eval split
    # GLUE folders with an evaluation file but no train.tsv (QNLI offline): train on a
    # stratified share of the evaluation file and evaluate on the other `split_eval`
    split_eval: float | None = Field(default=None, gt=0.0, lt=1.0)
    # the training file: squad's train-v1.1.json elsewhere than data_dir (default: data_dir's
    # own, if any); "csv" / "json" tasks: the rows to train on (and eval_file the rows to
    # score; without it `split_eval` (default 0.2) of train is held out, the same for
    # every seed)
    train_file: str | None = None
    eval_file: str | None = None
    # "csv" / "json" / "hf:<id>" tasks: which columns hold what. problem None:
    # "generation" when target_column is given, else "classification".
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    target_column: str | None = None
    problem: Literal["classification", "regression", "generation"] | None = None
    # classification tasks whose classes come from the data (csv, json, hf:<id>,
    # text-folder): the class names in label order (None: the sorted distinct training
    # labels). A federated server whose nodes bring their own data fills it with the
    # union of the nodes' labels, so every node maps a class to the same index.
    labels: list[str] | None = None
    # "hf:<id>" tasks: the split to evaluate on (None: validation, else test, else held out)
    eval_split: str | None = None
    # extractive QA: tokens shared by successive windows of a long context (None:
    # min(128, train.max_seq_len // 2)), and the longest answer span in tokens
    doc_stride: int | None = Field(default=None, ge=1)
    max_answer_len: int = Field(default=30, ge=1)
    # image tasks: images are resized to image_size x image_size (a multiple of the
    # model's patch size: 14 for DINOv2, whose position embeddings are interpolated)
    image_size: int = Field(default=224, ge=1)

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        names = [str(n).strip() for n in v]
        if len(names) < 2 or len(set(names)) != len(names) or not all(names):
            raise ValueError("task.labels lists at least 2 distinct, non-empty class names")
        return names


class LoraConfig(_Section):
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None: the family's default


class ModelConfig(_Section):
    name: str = "minilm"
    lora: LoraConfig | None = None
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    # How the frozen base's Linear weights are stored (LoRA only; embeddings, norms and
    # everything that trains stay fp32): "bf16", or "int8" weight-only with a per-output-
    # channel scale. See docs/memory.md ("A low-memory frozen base").
    base_dtype: Literal["fp32", "bf16", "int8"] = "fp32"


class TrainConfig(_Section):
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    lr: float | None = Field(default=None, gt=0)  # None: 5e-5 full fine-tuning, 2e-3 LoRA
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    schedule: Literal["linear", "constant"] = "linear"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    max_seq_len: int = Field(default=128, ge=8)
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int | None = Field(default=None, ge=1)  # None: evaluate at the end only
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    threads: int | None = Field(default=None, ge=1)  # torch intra-op threads; None: torch default

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give train.steps or train.epochs, not both")
        return self


class SplitConfig(_Section):
    cut: int = Field(default=3, ge=1)
    labels: Literal["cloud", "device"] = "cloud"
    server: Literal["shared", "per_client"] = "shared"


class LinkConfig(_Section):
    codec: Literal["identity", "fp16", "bf16", "int8", "topk", "pca", "sft"] = "identity"
    rank: int = Field(default=8, ge=1)
    # pca / sft: the wire format of the r-dim code and its gradient (default fp32)
    code_format: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    keep: float = Field(default=0.1, gt=0, le=1)  # topk
    calibration_batches: int = Field(default=4, ge=1)  # pca

    @model_validator(mode="after")
    def _code_format_needs_a_code(self) -> LinkConfig:
        if self.code_format != "fp32" and self.codec not in ("pca", "sft"):
            raise ValueError(
                f"code_format applies to the r-dim code of codecs 'pca' and 'sft', not "
                f"{self.codec!r}; for the full-width cut use codec = 'fp16', 'bf16' or 'int8'"
            )
        return self


class DeviceProfile(_Section):
    """One device of a federated fleet (`federated.devices`, or a `[[device]]` table of
    the file `federated.fleet` names). `rank`: its LoRA rank (fedlora; None: the fleet
    has one rank, `model.lora.r`). The other fields describe the device for parts of
    cotune that use them; nothing reads them yet (they are validated and recorded)."""

    name: str | None = None
    rank: int | None = Field(default=None, ge=1)
    memory_mib: float | None = Field(default=None, gt=0)
    up_mbps: float | None = Field(default=None, gt=0)
    down_mbps: float | None = Field(default=None, gt=0)
    latency_ms: float | None = Field(default=None, ge=0)


class FederatedConfig(_Section):
    clients: int = Field(default=4, ge=1)
    rounds: int = Field(default=10, ge=1)
    fraction: float = Field(default=1.0, gt=0, le=1)
    local_epochs: float = Field(default=1.0, gt=0)
    local_steps: int | None = Field(default=None, ge=1)  # overrides local_epochs when set
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(default=1.0, gt=0)
    shards_per_client: int = Field(default=2, ge=1)
    aggregate_every: int = Field(default=100, ge=1)
    round_timeout: float | None = Field(default=None, gt=0)  # seconds
    # score the global model every `eval_every` rounds (the last round always)
    eval_every: int = Field(default=1, ge=1)
    # where a client's training data comes from: "partition": its share of the task's
    # training data, cut by `partition` (simulation, inline, loopback deployment);
    # "node": all of its own data (a SuperNode's `data-path` node config, a splitfed
    # device's `--data`); the server then reads no training data. Deployment to a
    # SuperLink of yours (`runtime.superlink`) always uses "node".
    client_data: Literal["partition", "node"] = "partition"
    # Heterogeneous devices. Client k is device k mod len(list) of `client_ranks` (each
    # client's LoRA rank, fedlora) or of `devices` (`DeviceProfile`s). `fleet`: a TOML
    # file of `[[device]]` tables, read into `devices` when the config is loaded (the
    # resolved config carries the devices, so clients never need the file).
    client_ranks: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)
    fleet: str | None = None
    devices: list[DeviceProfile] = Field(default_factory=list)
    # how fedlora aggregates adapters of different ranks: "zero_pad" (HetLoRA: pad every
    # update to the largest rank with zeros, average over all clients), "rank_wise" (each
    # rank component averaged over the clients that hold it). See docs/federated.md.
    rank_aggregation: Literal["zero_pad", "rank_wise"] = "zero_pad"

    @model_validator(mode="after")
    def _fleet(self) -> FederatedConfig:
        if self.fleet is not None:  # `build_config` reads the file into `devices`
            raise ValueError(
                "federated.fleet is read into federated.devices by cotune.config's "
                "load_config / build_config; pass the config through them"
            )
        if self.client_ranks is not None and self.devices:
            raise ValueError(
                "give each client's rank in federated.client_ranks or in the devices "
                "(federated.fleet / federated.devices), not both"
            )
        listed = self.client_ranks or self.devices
        if len(listed) > self.clients:
            what = "client_ranks" if self.client_ranks is not None else "devices"
            raise ValueError(
                f"federated.{what} lists {len(listed)} entries but federated.clients = "
                f"{self.clients}: entries past the last client would never train; list at "
                f"most {self.clients} (they are cycled over the clients) or raise "
                "federated.clients"
            )
        ranked = [d.rank is not None for d in self.devices]
        if any(ranked) and not all(ranked):
            missing = [i for i, r in enumerate(ranked) if not r]
            raise ValueError(
                f"federated devices {missing[:5]} have no rank while others do: give every "
                "device a rank, or none (then all use model.lora.r)"
            )
        return self


class MemoryConfig(_Section):
    """`backward`: which activations are saved sparsely (none: all, dense). `checkpoint`:
    recompute each transformer layer's forward during backward, combinable with any
    `backward` mode. `backward = "checkpoint"` is shorthand for `backward = "none"` with
    `checkpoint = true`, rewritten so on validation (the resolved config says what runs)."""

    backward: Literal["none", "random", "norm", "backrazor", "checkpoint"] = "none"
    keep: float = Field(default=0.5, gt=0, le=1)
    rescale: bool = True
    norm: Literal["linf", "l1", "l2"] = "linf"
    ops: list[MemoryOp] = Field(default_factory=lambda: list(MEMORY_OPS))
    # the training process's C allocator: "release" gives freed large blocks back to the
    # OS at once (RSS follows the memory in use); "default" leaves glibc as it is;
    # "jemalloc" runs the process on jemalloc returning freed pages at once (the cotune
    # command restarts itself with it preloaded; needs libjemalloc installed)
    allocator: Literal["release", "default", "jemalloc"] = "release"
    # measure where each step's peak RSS goes (summary.json: memory_breakdown)
    report: bool = False
    # the device's memory cap (MiB of RSS): measured before training (a short run in a
    # process of its own), checked after every step; `--max-memory` on the CLI
    max_device_mib: float | None = Field(default=None, gt=0)
    checkpoint: bool = False

    @model_validator(mode="after")
    def _checkpoint_shorthand(self) -> MemoryConfig:
        if self.backward != "checkpoint":
            return self
        if "checkpoint" in self.model_fields_set and not self.checkpoint:
            raise ValueError(
                'backward = "checkpoint" turns activation checkpointing on, but checkpoint = '
                "false turns it off; for checkpointing alone drop checkpoint = false, for "
                'sparse saving alone pick backward = "random", "norm" or "backrazor"'
            )
        # object.__setattr__: a plain assignment would re-run this validator (assignments
        # are validated), and the fields are already valid
        object.__setattr__(self, "backward", "none")
        object.__setattr__(self, "checkpoint", True)
        self.model_fields_set.add("checkpoint")
        return self


Tracker = Literal["tensorboard", "mlflow", "wandb"]


class RuntimeConfig(_Section):
    transport: Literal["inprocess", "grpc"] = "inprocess"
    # where the cloud side computes: centralized training, the split/splitfed cloud,
    # the federated server's model. "auto" picks the first CUDA GPU when there is one.
    # Devices (split devices, federated clients) always compute on the CPU.
    device: str = Field(default="cpu", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # experiment trackers fed with the records of metrics.jsonl and train.jsonl:
    # "tensorboard" (RUN/tensorboard/), "mlflow" (MLFLOW_TRACKING_URI, else RUN/mlruns),
    # "wandb" (WANDB_MODE, offline by default, files under RUN/wandb)
    loggers: list[Tracker] = Field(default_factory=list)
    # federated: "simulation" (Flower's Ray engine), "deployment" (SuperLink + SuperNodes),
    # "inline" (the clients one after another in this process, no Ray: least overhead)
    engine: Literal["simulation", "deployment", "inline"] = "simulation"
    checkpoint: bool = True
    # write RUN_DIR/model/ (the trained model for transformers / peft) when the run ends;
    # `cotune export RUN_DIR` writes it later from the saved weights
    export: bool = True
    # split methods over gRPC (see docs/split.md). `cloud`: address (host:port) of a
    # running `cotune cloud`; None with transport="grpc" starts one on loopback.
    cloud: str | None = None
    device_id: int = Field(default=0, ge=0)
    tokens: str | None = None  # token file: one "<device id> <token>" line per device
    tls_cert: str | None = None  # cloud: PEM certificate (with tls_key) turns TLS on
    tls_key: str | None = None
    tls_ca: str | None = None  # device: PEM certificate/CA to trust (turns TLS on)
    tls_server_name: str | None = None  # device: name to check in the cloud's certificate
    max_message_mb: float = Field(default=64.0, gt=0)
    # cloud: per-device limits, enforced before a message is parsed (docs/security.md):
    # open streams, messages a second (bursts of twice as many), and how long a stream
    # may go without delivering a whole message before it is cut
    max_streams_per_device: int = Field(default=2, ge=1)
    max_messages_per_s: float = Field(default=200.0, gt=0)
    stream_idle_s: float = Field(default=900.0, gt=0)
    timeout_s: float = Field(default=600.0, gt=0)  # device: longest wait for an answer
    connect_timeout_s: float = Field(default=120.0, gt=0)  # device: wait for the cloud to be up
    reconnect: int = Field(default=3, ge=0)  # device: reconnection attempts after a drop
    # federated, simulation engine: clients training at once (None: one per CPU core)
    parallel_clients: int | None = Field(default=None, ge=1)
    # federated, deployment engine: address (host:port) of a SuperLink started by the
    # user; None starts a SuperLink and federated.clients SuperNodes on loopback
    superlink: str | None = None
    # opt out of TLS and authentication (docs/security.md): the loopback federation
    # runs without TLS and SuperNode authentication, `flwr run` submits in clear, and a
    # split cloud / device may use a non-loopback address without TLS. Warned about.
    insecure: bool = False


class GenerationConfig(_Section):
    """Decoding for generation tasks (e2e): beam search and the metrics to report."""

    num_beams: int = Field(default=4, ge=1)
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = Field(default=4, ge=0)
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=8, ge=1)
    metrics: list[GenerationMetric] = Field(default_factory=lambda: list(GENERATION_METRICS))


class KDConfig(_Section):
    # None: fedkd fills in the kind's default teacher (minilm for text, dinov2-small for images)
    teacher: str | None = None
    teacher_lora: LoraConfig | None = None
    public_fraction: float = Field(default=0.2, gt=0, lt=1)
    temperature: float = Field(default=2.0, gt=0)
    server_epochs: float = Field(default=1.0, gt=0)
    server_steps: int | None = Field(default=None, ge=1)
    teacher_lr: float | None = Field(default=None, gt=0)  # None: 5e-5 full, 2e-3 LoRA teacher


class ProxyConfig(_Section):
    kind: Literal["neuron", "layer_drop"] = "neuron"
    keep_layers: list[int] | None = None  # None: first and last
    ffn_keep: float = Field(default=0.25, gt=0)  # fraction (<= 1) or count (> 1)
    align_every: int = Field(default=10, ge=1)
    align_keep: float = Field(default=0.5, ge=0, le=1)
    align_steps: int = Field(default=200, ge=0)  # layer-level alignment before FL
    realign_steps: int = Field(default=50, ge=0)  # neuron-level alignment, every align_every
    align_lr: float = Field(default=3e-4, gt=0)
    # the cloud's public data (a task name; labels unused). None: fedpft fills in the
    # default of the task's modality (bbc-news for text, digits for images)
    public_corpus: str | None = None

    @field_validator("ffn_keep")
    @classmethod
    def _count_is_whole(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("ffn_keep is a fraction in (0, 1] or a whole neuron count")
        return v


class Config(_Section):
    """A whole experiment. `method` names a registered method (`cotune.methods`), which
    checks the method-specific rules and reads the optional sections it declares."""

    name: str = "run"
    method: str = Field(default="centralized", min_length=1)
    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    federated: FederatedConfig = Field(default_factory=FederatedConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    # Optional sections the method reads (set when the method resolves the config; None:
    # not resolved yet, `to_toml` then writes every section).
    _reads: frozenset[str] | None = PrivateAttr(default=None)
    # Sections the user's file gave (for the "not read by this method" warning).
    _given: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="after")
    def _nodes_bring_their_data(self) -> Config:
        """On a SuperLink of the user's, each SuperNode reads its own data (its
        `data-path` node config): never a share of the server's."""
        if (
            self.runtime.engine == "deployment"
            and self.runtime.superlink
            and self.federated.client_data != "node"
        ):
            self.federated.client_data = "node"
        return self

    def __eq__(self, other: object) -> bool:
        """Equal settings (what a method reads and the file holds are bookkeeping)."""
        if not isinstance(other, Config):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def resolved_lr(self) -> float:
        """The learning rate: explicit, or the default for the regime (full vs LoRA)."""
        if self.train.lr is not None:
            return self.train.lr
        return 2e-3 if self.model.lora is not None else 5e-5


# Sections a method may or may not read; the others every method reads.
OPTIONAL_SECTIONS = (
    "split", "link", "federated", "memory", "runtime", "kd", "proxy", "generation",
)  # fmt: skip


def unused_sections(given: set[str] | frozenset[str], reads: frozenset[str]) -> list[str]:
    """Optional sections present in the user's file that a method reading `reads` ignores."""
    return sorted(s for s in given if s in OPTIONAL_SECTIONS and s not in reads)
