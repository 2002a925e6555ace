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
    IMAGE_FAMILIES,
    ZOO_NAMES,
    Family,
    ImageGeometry,
    ModelSource,
    image_geometry,
    list_models,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    resolve,
)

__all__ = [
    "DEFAULT_TARGETS",
    "FAMILIES",
    "IMAGE_FAMILIES",
    "ZOO_NAMES",
    "ClassifierOutput",
    "Family",
    "ImageGeometry",
    "ModelSource",
    "SequenceClassifier",
    "adapter_state_dict",
    "apply_lora",
    "auto_pooling",
    "build_classifier",
    "image_geometry",
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
