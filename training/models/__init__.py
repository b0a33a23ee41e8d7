"""Model constructors and configs: open_clip models by name or from ``training/models/configs/*.json``."""

from training.models.clip import (
    CONFIG_DIR,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    create_clip,
    export_open_clip,
    get_tokenizer,
    make_clip_map,
    model_config,
    preprocess_config,
    register_configs,
    resolve_model_name,
)

__all__ = [
    "CONFIG_DIR",
    "OPEN_CLIP_CONFIG",
    "OPEN_CLIP_WEIGHTS",
    "create_clip",
    "export_open_clip",
    "get_tokenizer",
    "make_clip_map",
    "model_config",
    "preprocess_config",
    "register_configs",
    "resolve_model_name",
]
