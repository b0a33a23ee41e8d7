"""The denoising network: a diffusers ``UNet2DConditionModel`` built from the project's JSON configs.

``unet-tiny.json`` learns the demo site on a CPU (8x8x4 latents), ``unet-small.json`` is a GPU model for 32x32x4
latents, ``unet-sd15.json`` is Stable Diffusion 1.x's architecture. Each has a down path, a cross-attention middle
block and an up path with skip connections; the cross-attention reads the text encoder's per-token hidden states.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from training.models.clip import CONFIG_DIR

UNET_PREFIX = "unet-"


def unet_config_path(config: str) -> Path:
    """The JSON file of a U-Net config: "tiny" -> configs/unet-tiny.json; a path ending in .json is used as is."""
    path = Path(config) if config.endswith(".json") else CONFIG_DIR / f"{UNET_PREFIX}{config}.json"
    if not path.is_file():
        known = sorted(p.stem.removeprefix(UNET_PREFIX) for p in CONFIG_DIR.glob(f"{UNET_PREFIX}*.json"))
        raise ValueError(f"unknown U-Net config {config!r}: not a JSON file nor one of {known}")
    return path


def unet_config(config: str, cross_attention_dim: int | None = None, sample_size: int | None = None) -> dict:
    """The diffusers config dict of ``config``, with the text width and latent size filled in when given."""
    doc = json.loads(unet_config_path(config).read_text(encoding="utf-8"))
    doc = {k: v for k, v in doc.items() if not k.startswith("_")}
    if cross_attention_dim is not None:
        doc["cross_attention_dim"] = int(cross_attention_dim)
    if sample_size is not None:
        doc["sample_size"] = int(sample_size)
    return doc


def build_unet(
    config: str,
    cross_attention_dim: int | None = None,  # the text encoder's width (hidden size per token)
    sample_size: int | None = None,  # latent side, pixels / VAE downsampling (documentation for diffusers' pipelines)
) -> UNet2DConditionModel:
    """A randomly initialised fp32 U-Net for ``config``, channels_last (the memory format GPU convs prefer)."""
    unet = UNet2DConditionModel.from_config(unet_config(config, cross_attention_dim, sample_size))
    return unet.to(memory_format=torch.channels_last)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
