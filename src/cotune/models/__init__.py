"""cotune.models: the model zoo, classifiers with pooling heads, and LoRA via peft."""

from cotune.models.classifier import (
    ClassifierOutput,
    SequenceClassifier,
    auto_pooling,
    build_classifier,
)
from cotune.models.lora import (
    DEFAULT_TARGETS,
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    trainable_parameters,
    unwrap,
)
from cotune.models.tiny import tiny_config
from cotune.models.zoo import (
    FAMILIES,
    ZOO_NAMES,
    Family,
    ModelSource,
    list_models,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    resolve,
)

__all__ = [
    "DEFAULT_TARGETS",
    "FAMILIES",
    "ZOO_NAMES",
    "ClassifierOutput",
    "Family",
    "ModelSource",
    "SequenceClassifier",
    "adapter_state_dict",
    "apply_lora",
    "auto_pooling",
    "build_classifier",
    "list_models",
    "load_adapter_state_dict",
    "load_backbone",
    "load_causal_lm",
    "load_tokenizer",
    "resolve",
    "tiny_config",
    "trainable_parameters",
    "unwrap",
]
