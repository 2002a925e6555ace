"""`fedpft`: federated proxy fine-tuning.

The cloud keeps the full model (FM) and sends devices a proxy built from it (top-m FFN
neurons by saliency in every layer outside `proxy.keep_layers`, or whole layers
dropped with `proxy.kind = "layer_drop"`), aligned layer by layer on public data
(`proxy.public_corpus`: text for text tasks, images for image tasks) before federated
training and neuron by neuron during it; devices train LoRA on the proxy's attention
projections plus the head, and the aggregated adapter is plugged into the FM, which is
evaluated every round. Text encoders (BERT, RoBERTa) and DINOv2 ViTs have proxies; the
task goes through its adapter (classification, extractive QA, image classification).

Read in this order: `cloud.py` (`ProxyHook`, the server hook: build, align, ship the
proxy, collect neuron statistics, re-align), `device.py` (`proxy_local_train`, the
client round), `alignment.py` (the alignment losses and procedures). The proxy's
structure (which neurons or layers it keeps, name mapping) is `cotune.models.proxy`.
"""

from __future__ import annotations

from cotune.config import Config
from cotune.config.schema import LoraConfig
from cotune.data.registry import canonical_name, task_modality
from cotune.errors import ConfigError, ModelError
from cotune.methods.fedpft.cloud import ProxyHook
from cotune.methods.fedpft.device import proxy_local_train
from cotune.methods.spec import FederatedSpec, MethodSpec, reject_task_kind
from cotune.models.proxy import ATTENTION_PROJECTIONS, proxy_family

# the cloud's public data when `proxy.public_corpus` is not set, by the task's modality:
# the first of these that is not the clients' own task
DEFAULT_PUBLIC = {"text": ("bbc-news",), "image": ("digits", "fashion-mnist")}


def check_public_corpus(cfg: Config) -> None:
    """Fill in `proxy.public_corpus` for the task's modality, and refuse the clients'
    own task or public data of another modality (a `ConfigError`). An unknown task
    name is left for `load_task` to report."""
    try:
        task, modality = canonical_name(cfg.task.name), task_modality(cfg.task.name)
    except ConfigError:
        return
    others = [name for name in DEFAULT_PUBLIC[modality] if name != task]
    example = f" (e.g. {others[0]!r})" if others else ""
    if cfg.proxy.public_corpus is None:
        if not others:
            raise ConfigError(
                f"fedpft aligns the proxy on public {modality} data the clients do not hold, "
                f"and its default, {task!r}, is the clients' task: set proxy.public_corpus "
                f"to another {modality} task"
            )
        cfg.proxy.public_corpus = others[0]
    public = cfg.proxy.public_corpus
    try:
        public_name, public_modality = canonical_name(public), task_modality(public)
    except ConfigError as err:
        raise ConfigError(f"proxy.public_corpus = {public!r}: {err}") from None
    if public_name == task:
        raise ConfigError(
            f"proxy.public_corpus = {public!r} is the task the clients train on; the cloud "
            f"aligns on public {modality} data the clients do not hold{example}"
        )
    if public_modality != modality:
        raise ConfigError(
            f"proxy.public_corpus = {public!r} holds {public_modality} data, but task "
            f"{task!r} is {modality}: the proxy is aligned on public data of the clients' "
            f"kind{example}"
        )


def configure(cfg: Config) -> None:
    reject_task_kind(cfg, ("regression", "generation"), "fedlora or fedavg for it")
    if cfg.model.base_dtype != "fp32":
        # the cloud aligns the proxy's frozen FFN weights by training them and ships
        # them to the devices as fp32 tensors: a bf16 / int8 base does not fit that yet
        raise ConfigError(
            f"fedpft does not support model.base_dtype = {cfg.model.base_dtype!r} (the "
            "cloud trains and ships the proxy's frozen weights in fp32); use "
            "model.base_dtype = 'fp32', or a low-memory base with method 'fedlora'."
        )
    if cfg.model.lora is None:
        cfg.model.lora = LoraConfig()
    if cfg.model.lora.target_modules is None:
        try:
            family = proxy_family(cfg.model.name)
        except ModelError as err:
            raise ConfigError(f"fedpft: {err}") from None
        cfg.model.lora.target_modules = list(ATTENTION_PROJECTIONS[family])
    check_public_corpus(cfg)


SPEC = MethodSpec(
    name="fedpft",
    summary="devices train LoRA on an aligned, neuron-pruned proxy of the cloud's model",
    runs=FederatedSpec(client_train=proxy_local_train, server_hook=ProxyHook),
    reads=frozenset({"federated", "link", "proxy", "memory", "runtime"}),
    configure=configure,
)

__all__ = ["DEFAULT_PUBLIC", "SPEC", "ProxyHook", "proxy_local_train"]
