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
    # the docstring under each field is its help text (`cotune config --defaults`)
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class TaskConfig(_Section):
    """What to learn: the task and where its data is."""

    name: str = "bbc-news"
    """The task (`cotune tasks`): bbc-news, glue/<cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli>,
    squad, e2e, digits, fashion-mnist, text-folder, csv, json, hf:<id>, ..."""
    data_dir: str | None = None
    """The task's data folder (relative to the config file's folder); unset: the task's
    packaged data, where it has some."""
    max_train_examples: int | None = Field(default=None, ge=1)
    """Train on a seeded subsample of this many examples (unset: all)."""
    max_eval_examples: int | None = Field(default=None, ge=1)
    """Score a seeded subsample of this many examples (unset: all)."""
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Tasks with no evaluation split: the share of the data held out to score."""
    split_eval: float | None = Field(default=None, gt=0.0, lt=1.0)
    """GLUE folders with an evaluation file but no train.tsv (QNLI offline): train on a
    stratified share of the evaluation file and evaluate on the other `split_eval`."""
    train_file: str | None = None
    """The training file: squad's train-v1.1.json elsewhere than data_dir (unset:
    data_dir's own, if any); csv / json tasks: the rows to train on (without eval_file,
    `split_eval` (default 0.2) of them is held out, the same for every seed)."""
    eval_file: str | None = None
    """csv / json tasks: the rows to score."""
    text_column: str = "text"
    """csv / json / hf:<id> tasks: the column holding the text."""
    text_pair_column: str | None = None
    """csv / json / hf:<id> tasks: the column of the second text of a pair (unset: none)."""
    label_column: str = "label"
    """csv / json / hf:<id> tasks: the column holding the label."""
    target_column: str | None = None
    """csv / json / hf:<id> tasks: the column of the text to generate (generation)."""
    problem: Literal["classification", "regression", "generation"] | None = None
    """csv / json / hf:<id> tasks: classification | regression | generation (unset:
    generation when target_column is given, else classification)."""
    labels: list[str] | None = None
    """Classification tasks whose classes come from the data (csv, json, hf:<id>,
    text-folder): the class names in label order (unset: the sorted distinct training
    labels; a federated server whose nodes bring their own data fills in the union of
    the nodes' labels)."""
    eval_split: str | None = None
    """hf:<id> tasks: the split to evaluate on (unset: validation, else test, else held out)."""
    doc_stride: int | None = Field(default=None, ge=1)
    """Extractive QA: tokens shared by successive windows of a long context (unset:
    min(128, train.max_seq_len // 2))."""
    max_answer_len: int = Field(default=30, ge=1)
    """Extractive QA: the longest answer span, in tokens."""
    image_size: int = Field(default=224, ge=1)
    """Image tasks: images are resized to image_size x image_size (a multiple of the
    model's patch size: 14 for DINOv2, whose position embeddings are interpolated)."""

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
    """LoRA adapters: the base model frozen, low-rank updates trained."""

    r: int = Field(default=8, ge=1)
    """The adapters' rank."""
    alpha: float = Field(default=16.0, gt=0)
    """The scaling numerator: updates are scaled by alpha / r."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout on the adapters' input."""
    target_modules: list[str] | None = None
    """The modules that get adapters (unset: the model family's default, e.g. query and
    value for BERT-like encoders)."""


class ModelConfig(_Section):
    """Which model, and what of it trains."""

    name: str = "minilm"
    """A zoo name (`cotune models`), a save_pretrained folder, or a Hugging Face hub id."""
    lora: LoraConfig | None = None
    """LoRA adapters, e.g. lora = { r = 8, alpha = 16, dropout = 0.1 } (unset: full
    fine-tuning)."""
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    """How a classifier pools the tokens (auto: the family's usual)."""
    base_dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    """How the frozen base's Linear weights are stored under LoRA (int8: weight-only, a
    scale per output channel); what trains stays fp32. See docs/memory.md."""


class TrainConfig(_Section):
    """The training loop (local training of federated clients included)."""

    steps: int | None = Field(default=None, ge=0)
    """Optimizer steps to train (give steps or epochs, not both; neither: 1 epoch).
    0 (centralized only): no training, the model as built is scored (a baseline)."""
    epochs: float | None = Field(default=None, gt=0)
    """Passes over the training data (fractions allowed)."""
    batch_size: int = Field(default=16, ge=1)
    """Training examples per step."""
    eval_batch_size: int = Field(default=64, ge=1)
    """Examples per batch when scoring."""
    lr: float | None = Field(default=None, gt=0)
    """The peak learning rate (unset: 5e-5 for full fine-tuning, 2e-3 under LoRA)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """The optimizer."""
    weight_decay: float = Field(default=0.01, ge=0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    """The share of the steps over which the learning rate rises linearly from 0."""
    schedule: Literal["linear", "constant"] = "linear"
    """After warmup: linear (decays to 0 at the last step) | constant."""
    max_grad_norm: float | None = Field(default=1.0, ge=0)
    """Clip the gradients' global norm to this (0: no clipping)."""
    max_seq_len: int = Field(default=128, ge=8)
    """Texts are cut to this many tokens."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The compute precision (bf16: CPU autocast)."""
    eval_every: int | None = Field(default=None, ge=1)
    """Score every this many steps (unset: at the end only)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    """Label smoothing of the classification loss."""
    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads (unset: torch's default)."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give train.steps or train.epochs, not both")
        return self


class SplitConfig(_Section):
    """Split and split-federated training (methods split, splitfed): where the model is cut."""

    cut: int = Field(default=3, ge=1)
    """The device runs the embeddings and the transformer layers before this one (1 to
    layers - 1); the cloud the rest."""
    labels: Literal["cloud", "device"] = "cloud"
    """cloud: the labels cross with the activations and the cloud holds the head |
    device: U-shaped, the head and the loss stay on the device."""
    server: Literal["shared", "per_client"] = "shared"
    """splitfed: one cloud half shared by all devices | one per device."""


NetworkProfile = Literal["datacenter", "wifi", "lte", "constrained"]
NETWORK_PROFILES: tuple[NetworkProfile, ...] = ("datacenter", "wifi", "lte", "constrained")


class NetworkConfig(_Section):
    """`[link.network]`: an emulated link between each device and the cloud (values in
    `cotune.link.network.PROFILES`; the model in README "Emulated networks").

    `profile` names a preset; explicit fields override it. Without a profile, `up_mbps`
    and `down_mbps` are required (latency, jitter and loss default to 0). `mode`:
    "clock" adds each message's transfer time to a simulated clock without sleeping;
    "throttle" really paces the bytes (and reports the same clock)."""

    profile: str | None = None
    """A named preset: datacenter | wifi | lte | constrained (explicit keys override it)."""
    mode: Literal["clock", "throttle"] = "clock"
    """clock (a simulated clock, no sleeping) | throttle (the bytes really paced)."""
    up_mbps: float | None = None
    """Device -> cloud bandwidth, Mbit/s (10^6 bit/s)."""
    down_mbps: float | None = None
    """Cloud -> device bandwidth, Mbit/s."""
    latency_ms: float | None = None
    """One-way propagation delay, milliseconds."""
    jitter_ms: float | None = None
    """Uniform +- jitter around the latency, milliseconds (at most latency_ms)."""
    loss: float | None = None
    """Packet loss probability, modelled as retransmission time."""

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str | None) -> str | None:
        if v is not None and v not in NETWORK_PROFILES:
            raise ValueError(
                f"unknown network profile {v!r}; valid profiles: {', '.join(NETWORK_PROFILES)} "
                "(or give up_mbps and down_mbps without a profile)"
            )
        return v

    @field_validator("up_mbps", "down_mbps")
    @classmethod
    def _positive_rate(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"bandwidth must be a positive number of Mbit/s (e.g. 10), got {v}")
        return v

    @field_validator("latency_ms", "jitter_ms")
    @classmethod
    def _non_negative_delay(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0:
            raise ValueError(f"delays are milliseconds >= 0, got {v}")
        return v

    @field_validator("loss")
    @classmethod
    def _loss_probability(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v < 1:
            raise ValueError(f"loss is a packet loss probability in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _rates_known(self) -> NetworkConfig:
        if self.profile is None and (self.up_mbps is None or self.down_mbps is None):
            raise ValueError(
                "give a profile (one of " + ", ".join(NETWORK_PROFILES) + ") or both "
                "up_mbps and down_mbps"
            )
        if self.profile is None and (self.jitter_ms or 0) > (self.latency_ms or 0):
            raise ValueError(
                f"jitter_ms ({self.jitter_ms}) must not exceed latency_ms "
                f"({self.latency_ms or 0}): the delay is latency +- jitter"
            )
        return self


class LinkConfig(_Section):
    """What crosses the cut between device and cloud (split methods; docs/split.md)."""

    network: NetworkConfig | None = None
    """An emulated network between each device and the cloud (unset: no emulation);
    see [link.network]."""
    codec: Literal["identity", "fp16", "bf16", "int8", "topk", "pca", "sft"] = "identity"
    """What the device sends per real token: identity (the full-width activations), fp16 /
    bf16 / int8 (rounded), topk (the largest values), pca / sft (an r-dim code; sft: the
    SFT low-rank cut). See docs/split.md."""
    rank: int = Field(default=8, ge=1)
    """pca / sft: the values sent per real token."""
    code_format: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    """pca / sft: the wire format of the r-dim code and its gradient."""
    keep: float = Field(default=0.1, gt=0, le=1)
    """topk: the share of each token's values sent."""
    calibration_batches: int = Field(default=4, ge=1)
    """pca: the batches of cut activations the device fits its basis on."""

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
    has one rank, `model.lora.r`). `network`: a named link profile for it, in place of
    `[link.network]`'s figures when that is set (the federated clock); `up_mbps`,
    `down_mbps`, `latency_ms`: its link's figures, over both; `memory_mib` is validated
    and recorded."""

    name: str | None = None
    """The device's name (for reports)."""
    rank: int | None = Field(default=None, ge=1)
    """fedlora: this device's LoRA rank (unset: model.lora.r)."""
    memory_mib: float | None = Field(default=None, gt=0)
    """The device's memory, MiB (recorded)."""
    network: NetworkProfile | None = None
    """The device's link as a named profile (datacenter | wifi | lte | constrained: all
    its figures, loss and jitter included), in place of [link.network]'s."""
    up_mbps: float | None = Field(default=None, gt=0)
    """The device's uplink, Mbit/s (recorded)."""
    down_mbps: float | None = Field(default=None, gt=0)
    """The device's downlink, Mbit/s (recorded)."""
    latency_ms: float | None = Field(default=None, ge=0)
    """The device's link latency, ms (recorded)."""


class FaultsConfig(_Section):
    """Injected client failures (`[federated.faults]`), to check that rounds survive
    them: each round the server marks `fail_fraction` of the sampled clients (rounded
    up; drawn by a generator seeded with (`seed`, round)) and their ClientApp fails the
    train message: "raise" raises, "timeout" holds the reply until the round's
    deadline (`federated.round_timeout`) has passed, "mixed" picks one of the two per
    client. Counted per round in metrics.jsonl (`faults_injected`, and the failures
    in `clients_failed` / `clients_timed_out`)."""

    fail_fraction: float = Field(default=0.0, ge=0, le=1)
    """The share of each round's sampled clients made to fail (rounded up; 0: none)."""
    mode: Literal["raise", "timeout", "mixed"] = "raise"
    """raise (the client raises) | timeout (it holds its reply past the round's deadline)
    | mixed (one of the two per client)."""
    seed: int = 0
    """Seeds which clients fail (with the round number)."""


class FederatedConfig(_Section):
    """Federated methods (fedavg, fedlora, fedkd, fedpft) and splitfed's devices."""

    clients: int = Field(default=4, ge=1)
    """The number of clients (devices)."""
    rounds: int = Field(default=10, ge=1)
    """Federated rounds."""
    fraction: float = Field(default=1.0, gt=0, le=1)
    """The share of the clients that train in each round."""
    local_epochs: float = Field(default=1.0, gt=0)
    """Passes over its data a client trains per round."""
    local_steps: int | None = Field(default=None, ge=1)
    """Steps a client trains per round (overrides local_epochs when set)."""
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    """How the training data is cut among clients: iid | dirichlet (label skew, alpha) |
    shards (shards_per_client label-sorted shards each)."""
    alpha: float = Field(default=1.0, gt=0)
    """dirichlet: the concentration (smaller: more skewed)."""
    shards_per_client: int = Field(default=2, ge=1)
    """shards: the shards each client gets."""
    aggregate_every: int = Field(default=100, ge=1)
    """splitfed: average the devices' adapters every this many steps."""
    round_timeout: float | None = Field(default=None, gt=0)
    """Seconds the server waits for a round's clients (unset: no limit)."""
    eval_every: int = Field(default=1, ge=1)
    """Score the global model every this many rounds (the last round always)."""
    client_data: Literal["partition", "node"] = "partition"
    """Where a client's training data comes from: partition (its share of the task's
    data, cut by `partition`) | node (all of its own data: a SuperNode's data-path, a
    splitfed device's --data; the server then reads no training data). Deployment to a
    SuperLink of yours (runtime.superlink) always uses node."""
    client_ranks: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)
    """fedlora: each client's LoRA rank; client k has rank client_ranks[k mod len] (unset:
    all model.lora.r)."""
    fleet: str | None = None
    """A TOML file of [[device]] tables, read into `devices` when the config is loaded."""
    devices: list[DeviceProfile] = Field(default_factory=list)
    """The fleet's devices: client k is device k mod len (an empty list: all alike)."""
    rank_aggregation: Literal["zero_pad", "rank_wise"] = "zero_pad"
    """fedlora with several ranks: zero_pad (HetLoRA: pad every update to the largest
    rank, average over all clients) | rank_wise (each rank component averaged over the
    clients holding it). See docs/federated.md."""
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    """Injected client failures, to test that rounds survive them (see [federated.faults])."""
    secagg: bool = False
    """fedavg, fedlora: SecAgg+ secure aggregation (Flower's), the server only learns the
    sum of the round's masked, quantised updates (docs/privacy.md)."""
    secagg_shares: int | None = None
    """SecAgg+: the shares each client's secrets are split into, one per neighbour
    (itself included), 3 or more; unset: every client sampled in the round. (Checked
    with the method, when the config is resolved.)"""
    secagg_threshold: int | None = None
    """SecAgg+: the shares needed to rebuild a secret, below `secagg_shares`; a round
    survives while every client keeps this many live neighbours. Unset: a majority of
    the shares (shares // 2 + 1). At least 2."""
    secagg_clip_range: float = Field(default=8.0, gt=0, allow_inf_nan=False)
    """SecAgg+: each value of an update (trained minus received weights) is clipped to
    [-secagg_clip_range, secagg_clip_range] before it is quantised."""

    @model_validator(mode="after")
    def _timeouts_need_a_deadline(self) -> FederatedConfig:
        f = self.faults
        if f.fail_fraction > 0 and f.mode != "raise" and self.round_timeout is None:
            raise ValueError(
                f"federated.faults.mode = {f.mode!r} holds the marked clients past the "
                "round's deadline: set federated.round_timeout (seconds), or use "
                "mode = 'raise'"
            )
        return self

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
    """Which activations are saved sparsely for backward: none (all, dense) | random |
    norm | backrazor | checkpoint (shorthand for checkpoint = true)."""
    keep: float = Field(default=0.5, gt=0, le=1)
    """The share of each saved activation kept (random, norm, backrazor); of what, says
    keep_of."""
    keep_of: Literal["padded", "real"] = "padded"
    """What keep is a share of: padded (each sample's token rows at the batch's padded
    length, so a sample shorter than keep x length keeps every real token) | real (each
    sample's real tokens: the same bytes per row mode, fewer kept values with backrazor).
    The same without padding (full-length text, images)."""
    rescale: bool = True
    """random: weight the kept rows by 1 / P(kept), so the gradient stays unbiased (norm
    and backrazor choose deterministically and are not rescaled)."""
    norm: Literal["linf", "l1", "l2"] = "linf"
    """norm: the norm that ranks what is kept: linf | l1 | l2."""
    ops: list[MemoryOp] = Field(default_factory=lambda: list(MEMORY_OPS))
    """The operations whose saved activations are sparsified: linear, matmul, softmax,
    layernorm, activation."""
    allocator: Literal["release", "default", "jemalloc"] = "release"
    """The training process's C allocator: release (freed large blocks go back to the OS
    at once) | default (glibc as it is) | jemalloc (needs libjemalloc installed)."""
    report: bool = False
    """Measure where each step's peak RSS goes (summary.json: memory_breakdown)."""
    max_device_mib: float | None = Field(default=None, gt=0)
    """The device's memory cap, MiB of RSS: measured before training, checked after every
    step (--max-memory on the command line; unset: no cap)."""
    checkpoint: bool = False
    """Recompute each transformer layer's forward during backward (activation
    checkpointing), combinable with any `backward`."""
    checkpoint_chunks: int = Field(default=1, ge=1)
    """With checkpoint: run each checkpointed layer over this many slices of the batch,
    so forward and recomputation hold one slice's temporaries (the same gradients up to
    float rounding; dropout masks are drawn slice by slice)."""
    step_in_backward: bool = False
    """Step the optimiser inside backward: each parameter is updated, and its gradient
    freed, as soon as its gradient is complete, so the model's gradients never all exist
    at once (the same updates; needs train.max_grad_norm = 0: no global-norm clipping).
    Trainable embedding tables then get sparse gradients, stepped in blocks of rows."""

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

    @model_validator(mode="after")
    def _chunks_need_checkpoint(self) -> MemoryConfig:
        if self.checkpoint_chunks > 1 and not self.checkpoint:
            raise ValueError(
                f"checkpoint_chunks = {self.checkpoint_chunks} slices the batch of "
                "checkpointed layers, but checkpointing is off; set checkpoint = true "
                '(or backward = "checkpoint"), or checkpoint_chunks = 1'
            )
        return self


Tracker = Literal["tensorboard", "mlflow", "wandb"]


class RuntimeConfig(_Section):
    """Where and how the run executes: processes, links, trackers, outputs."""

    transport: Literal["inprocess", "grpc"] = "inprocess"
    """Split methods: inprocess (the cloud in this process) | grpc (a cloud process,
    on loopback unless `cloud` is given)."""
    device: str = Field(default="cpu", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """Where the cloud side computes (centralized training, the split/splitfed cloud, the
    federated server's model): auto (the first CUDA GPU if any, else cpu) | cpu | cuda |
    cuda:N. Devices (split devices, federated clients) always compute on the CPU."""
    loggers: list[Tracker] = Field(default_factory=list)
    """Experiment trackers fed with metrics.jsonl and train.jsonl: tensorboard
    (RUN/tensorboard/) | mlflow (MLFLOW_TRACKING_URI, else RUN/mlruns) | wandb (WANDB_MODE,
    offline by default)."""
    engine: Literal["simulation", "deployment", "inline"] = "simulation"
    """Federated: simulation (Flower's Ray engine) | deployment (SuperLink + SuperNodes) |
    inline (the clients one after another in this process, no Ray: least overhead)."""
    checkpoint: bool = True
    """Save checkpoints to continue an interrupted run with `cotune run --resume`:
    federated methods after every round, centralized every `checkpoint_minutes`."""
    checkpoint_minutes: float = Field(default=10.0, ge=0)
    """Centralized: minutes of training between checkpoints (0: after every step)."""
    export: bool = True
    """Write RUN_DIR/model/ (the trained model for transformers / peft) when the run ends;
    `cotune export RUN_DIR` writes it later from the saved weights."""
    cloud: str | None = None
    """Split methods over gRPC: the address (host:port) of a running `cotune cloud`
    (unset with transport = "grpc": one is started on loopback)."""
    device_id: int = Field(default=0, ge=0)
    """Split device: this device's id in the token file."""
    tokens: str | None = None
    """The token file: one "<device id> <token>" line per device (a remote cloud and its
    devices need it; a loopback cloud makes its own)."""
    tls_cert: str | None = None
    """Cloud: PEM certificate (with tls_key) turns TLS on."""
    tls_key: str | None = None
    """Cloud: the PEM private key of tls_cert."""
    tls_ca: str | None = None
    """Device: the PEM certificate / CA to trust (turns TLS on)."""
    tls_server_name: str | None = None
    """Device: the name to check in the cloud's certificate (unset: gRPC's default, the
    address's host)."""
    max_message_mb: float = Field(default=64.0, gt=0)
    """The largest gRPC message, MB."""
    max_streams_per_device: int = Field(default=2, ge=1)
    """Cloud: open streams one device may hold; more are refused before a message is
    parsed (docs/security.md)."""
    max_messages_per_s: float = Field(default=200.0, gt=0)
    """Cloud: messages a second one device may send (bursts of twice as many)."""
    stream_idle_s: float = Field(default=900.0, gt=0)
    """Cloud: how long a stream may go without delivering a whole message before it is
    cut, seconds."""
    timeout_s: float = Field(default=600.0, gt=0)
    """Device: the longest wait for an answer, seconds."""
    connect_timeout_s: float = Field(default=120.0, gt=0)
    """Device: how long to wait for the cloud to be up, seconds."""
    reconnect: int = Field(default=3, ge=0)
    """Device: reconnection attempts after a dropped link."""
    parallel_clients: int | None = Field(default=None, ge=1)
    """Federated, simulation engine: clients training at once (unset: one per CPU core)."""
    superlink: str | None = None
    """Federated, deployment engine: the address (host:port) of a SuperLink you started
    (unset: a SuperLink and federated.clients SuperNodes are started on loopback)."""
    insecure: bool = False
    """Opt out of TLS and authentication (docs/security.md): the loopback federation runs
    without TLS and SuperNode authentication, `flwr run` submits in clear, and a split
    cloud / device may use a non-loopback address without TLS. Warned about."""


class PrivacyConfig(_Section):
    """Differential privacy (see docs/privacy.md for what each covers and what it does
    not). split, splitfed: on the device, before the codec, every token row of the cut
    activations is clipped to L2 norm `clip` and Gaussian noise is added, its scale set
    by the accountant so that training spends `epsilon` at `delta` per training example.
    fedavg, fedlora, fedkd with `federated` set: user-level DP of the federated rounds
    with Flower's fixed-clipping wrappers, each client's update clipped to L2 norm
    `clip` (on the server or on the client) and Gaussian noise added to the average on
    the server, its scale set by the accountant so that the run's rounds spend `epsilon`
    at `delta` per client."""

    epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """The privacy budget spent over the whole training, per training example (split,
    splitfed) or per client (federated rounds); unset: no noise."""
    delta: float = Field(default=1e-5, gt=0, lt=1, allow_inf_nan=False)
    """The delta of (epsilon, delta)-DP (well below 1 / the number of training examples,
    or of clients for federated rounds)."""
    clip: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """The L2 bound each token row of the cut is clipped to before the noise (split,
    splitfed), or each client's model update (federated rounds)."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus's RDP or PRV accountant, to set the noise from epsilon and delta."""
    noise_seed: int | None = None
    """Unset: the noise comes from the OS's randomness. A fixed seed makes runs repeatable,
    but whoever knows it can subtract the noise: for experiments only."""
    federated: Literal["server", "client"] | None = None
    """fedavg, fedlora, fedkd: DP of the federated rounds, clipping each update on the
    server (server) or on the client before it is sent (client); unset: off."""


class GenerationConfig(_Section):
    """Decoding for generation tasks (e2e): beam search and the metrics to report."""

    num_beams: int = Field(default=4, ge=1)
    """Beam width (1: greedy)."""
    length_penalty: float = 0.8
    """Beam search's length penalty exponent."""
    no_repeat_ngram_size: int = Field(default=4, ge=0)
    """No n-gram of this size is generated twice (0: no limit)."""
    max_new_tokens: int = Field(default=64, ge=1)
    """The longest generated text, in tokens."""
    batch_size: int = Field(default=8, ge=1)
    """Prompts decoded at once."""
    metrics: list[GenerationMetric] = Field(default_factory=lambda: list(GENERATION_METRICS))
    """The metrics reported: bleu, nist, meteor, rouge_l, cider."""


class KDConfig(_Section):
    """fedkd: the server-side teacher and the mutual distillation."""

    teacher: str | None = None
    """The server's teacher model (unset: minilm for text, dinov2-small for images)."""
    teacher_lora: LoraConfig | None = None
    """LoRA for the teacher, e.g. { r = 8 } (unset: full fine-tuning)."""
    public_fraction: float = Field(default=0.2, gt=0, lt=1)
    """The share of the training data held by the server as public distillation data."""
    temperature: float = Field(default=2.0, gt=0)
    """The distillation temperature."""
    server_epochs: float = Field(default=1.0, gt=0)
    """Passes over the public data per round of distillation."""
    server_steps: int | None = Field(default=None, ge=1)
    """Distillation steps per round (overrides server_epochs when set)."""
    teacher_lr: float | None = Field(default=None, gt=0)
    """The teacher's learning rate (unset: 5e-5 full, 2e-3 LoRA)."""


class ProxyConfig(_Section):
    """fedpft: the proxy model the devices fine-tune (docs/fedpft.md)."""

    kind: Literal["neuron", "layer_drop"] = "neuron"
    """The proxy: neuron (FFN neurons pruned, layers kept) or layer_drop (only keep_layers
    kept)."""
    keep_layers: list[int] | None = None
    """layer_drop: the layers kept (unset: the first and the last)."""
    ffn_keep: float = Field(default=0.25, gt=0)
    """neuron: the FFN neurons kept per layer, a fraction (<= 1) or a count (> 1)."""
    align_every: int = Field(default=10, ge=1)
    """Re-align the proxy with the full model every this many rounds."""
    align_keep: float = Field(default=0.5, ge=0, le=1)
    """At each re-alignment the least-used 1 - align_keep of each compressed layer's
    neurons are re-aligned."""
    align_steps: int = Field(default=200, ge=0)
    """Layer-level alignment steps before federated training."""
    realign_steps: int = Field(default=50, ge=0)
    """Neuron-level alignment steps, every align_every rounds."""
    align_lr: float = Field(default=3e-4, gt=0)
    """The alignment's learning rate."""
    public_corpus: str | None = None
    """The cloud's public data, a task name, labels unused (unset: bbc-news for text,
    digits for images)."""

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
    """The run's name: the default run folder is runs/<timestamp>-<name>."""
    method: str = Field(default="centralized", min_length=1)
    """centralized | split | splitfed | fedavg | fedlora | fedkd | fedpft (`cotune methods`)."""
    seed: int = 0
    """Seeds the model's new weights, the data order and subsamples, the partitions."""
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
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
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

    @model_validator(mode="after")
    def _no_steps_is_centralized_only(self) -> Config:
        if self.train.steps == 0 and self.method != "centralized":
            raise ValueError(
                "train.steps = 0 scores the model as built without training, which is "
                f"what method 'centralized' does; method {self.method!r} needs "
                "train.steps >= 1 (or train.epochs)"
            )
        return self

    @model_validator(mode="after")
    def _step_in_backward_needs_no_clipping(self) -> Config:
        if self.memory.step_in_backward and self.train.max_grad_norm:
            raise ValueError(
                "memory.step_in_backward = true updates each parameter as soon as its "
                "gradient is ready, so the global gradient norm that train.max_grad_norm = "
                f"{self.train.max_grad_norm} clips to is never known; set "
                "train.max_grad_norm = 0 (no clipping) or step_in_backward = false"
            )
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
    "split", "link", "federated", "memory", "runtime", "kd", "proxy", "generation", "privacy",
)  # fmt: skip


def unused_sections(given: set[str] | frozenset[str], reads: frozenset[str]) -> list[str]:
    """Optional sections present in the user's file that a method reading `reads` ignores."""
    return sorted(s for s in given if s in OPTIONAL_SECTIONS and s not in reads)
