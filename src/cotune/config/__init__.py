"""Typed config: schema, TOML loading, overrides."""

from cotune.config.load import build_config, load_config, parse_value, to_toml, write_config
from cotune.config.schema import (
    Config,
    DeviceProfile,
    FederatedConfig,
    GenerationConfig,
    KDConfig,
    LinkConfig,
    LoraConfig,
    MemoryConfig,
    ModelConfig,
    PrivacyConfig,
    ProxyConfig,
    RuntimeConfig,
    SplitConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DeviceProfile",
    "FederatedConfig",
    "GenerationConfig",
    "PrivacyConfig",
    "KDConfig",
    "LinkConfig",
    "LoraConfig",
    "MemoryConfig",
    "ModelConfig",
    "ProxyConfig",
    "RuntimeConfig",
    "SplitConfig",
    "TaskConfig",
    "TrainConfig",
    "build_config",
    "load_config",
    "parse_value",
    "to_toml",
    "write_config",
]
