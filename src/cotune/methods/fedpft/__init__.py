"""`fedpft`: federated proxy fine-tuning.

The cloud keeps the full model (FM) and sends devices a proxy built from it (top-m FFN
neurons by saliency in every layer outside `proxy.keep_layers`, or whole layers
dropped with `proxy.kind = "layer_drop"`), aligned layer by layer on public text
before federated training and neuron by neuron during it; devices train LoRA on the
proxy's attention projections plus the head, and the aggregated adapter is plugged
into the FM, which is evaluated every round.

Read in this order: `cloud.py` (`ProxyHook`, the server hook: build, align, ship the
proxy, collect neuron statistics, re-align), `device.py` (`proxy_local_train`, the
client round), `alignment.py` (the alignment losses and procedures). The proxy's
structure (which neurons or layers it keeps, name mapping) is `cotune.models.proxy`.
"""

from __future__ import annotations

from cotune.config import Config
from cotune.config.schema import LoraConfig
from cotune.errors import ConfigError
from cotune.methods.fedpft.cloud import ProxyHook
from cotune.methods.fedpft.device import proxy_local_train
from cotune.methods.spec import FederatedSpec, MethodSpec, reject_task_kind, require_model_family
from cotune.models.proxy import PROXY_FAMILIES

# LoRA on the proxy's attention projections (Q, K, V, attention output)
FEDPFT_TARGETS = ("query", "key", "value", "attention.output.dense")


def configure(cfg: Config) -> None:
    reject_task_kind(cfg, ("qa", "image-classification"), "fedlora or fedavg for QA and images")
    require_model_family(cfg, PROXY_FAMILIES, "fedpft (building a pruned proxy of the model)")
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
        cfg.model.lora.target_modules = list(FEDPFT_TARGETS)


SPEC = MethodSpec(
    name="fedpft",
    summary="devices train LoRA on an aligned, neuron-pruned proxy of the cloud's model",
    runs=FederatedSpec(client_train=proxy_local_train, server_hook=ProxyHook),
    reads=frozenset({"federated", "proxy", "memory", "runtime"}),
    configure=configure,
)

__all__ = ["FEDPFT_TARGETS", "SPEC", "ProxyHook", "proxy_local_train"]
