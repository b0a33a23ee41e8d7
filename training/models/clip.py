"""open_clip models by name or by the project's JSON configs, their input pipeline, and the open_clip export."""

from __future__ import annotations

import functools
import json
import logging
import random
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.images import open_rgb
from pipeline.shards import first_image

CONFIG_DIR = Path(__file__).parent / "configs"
PROJECT_PREFIX = "altforge-"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # the file open_clip's "local-dir:" loader reads
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the weights file open_clip prefers in a local dir


def register_configs() -> None:
    """Make the project's configs (``training/models/configs/*.json``) known to open_clip by file stem."""
    if f"{PROJECT_PREFIX}tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def resolve_model_name(name: str) -> str:
    """The open_clip name of a project config ("tiny" = "altforge-tiny"), a JSON path, or an open_clip name."""
    register_configs()
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {name}")
        open_clip.add_model_config(path)
        return path.stem
    if (CONFIG_DIR / f"{PROJECT_PREFIX}{name}.json").is_file():
        return PROJECT_PREFIX + name
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}: not a project config, JSON file or open_clip architecture")
    return name


def model_config(name: str) -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) of ``name``."""
    return open_clip.get_model_config(resolve_model_name(name))


def _not_random_init_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded")


def create_clip(name: str, device: torch.device | str = "cpu", grad_checkpointing: bool = False) -> torch.nn.Module:
    """A randomly initialised fp32 open_clip model (AMP casts at run time) for ``name``; without open_clip's
    warning that no pretrained weights were loaded (none were asked for: the trainer starts from scratch)."""
    root = logging.getLogger()
    root.addFilter(_not_random_init_notice)
    try:
        model = open_clip.create_model(resolve_model_name(name), pretrained=None, device=device)
    finally:
        root.removeFilter(_not_random_init_notice)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def get_tokenizer(name: str):
    """The tokenizer open_clip pairs with ``name`` (context length from its config)."""
    return open_clip.get_tokenizer(resolve_model_name(name))


def preprocess_config(cfg: dict) -> dict:
    """open_clip's preprocess config for a model config: input size, normalisation mean/std, resize mode.

    ``squash`` (resize to size x size, no crop) is what :func:`to_tensor` feeds the model in training and
    evaluation, so open_clip's transforms from the export (and curation's scorer) see images as training did.
    """
    size = cfg["vision_cfg"].get("image_size", 224)
    return {
        "size": size,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "squash",
    }


def export_open_clip(model: torch.nn.Module, cfg: dict, out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors``; returns the weights path.

    The directory then loads with ``open_clip.create_model_and_transforms("local-dir:OUT")``, and the weights
    with ``create_model_and_transforms(name, pretrained=OUT/open_clip_model.safetensors)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights = out / OPEN_CLIP_WEIGHTS
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(weights)
    (out / OPEN_CLIP_CONFIG).write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_config(cfg)}, indent=2), encoding="utf-8"
    )
    return weights


# ----------------------------------------------------------------------------------------------- input pipeline


def image_of(sample: dict) -> Image.Image:
    """Decode the first image field of a raw sample to RGB as curation scores it (upright, alpha on white, 16-bit
    grey scaled; raises KeyError if there is none)."""
    data = first_image(sample)
    if data is None:
        raise KeyError("no image field")
    return open_rgb(data)


def to_tensor(img: Image.Image, size: int, mean, std) -> torch.Tensor:
    """Resize to ``size``×``size`` (bicubic, aspect ratio not kept: open_clip's ``squash``) and normalise to a
    (3, size, size) float tensor."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def random_crop(img: Image.Image, rng: random.Random, min_scale: float) -> Image.Image:
    """A random square-ish crop covering at least ``min_scale`` of the area (no flips: captions say left/right)."""
    w, h = img.size
    scale = rng.uniform(min_scale, 1.0)
    cw, ch = max(1, round(w * scale**0.5)), max(1, round(h * scale**0.5))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def clip_map(
    sample: dict,
    rng: random.Random,
    tokenizer,
    size: int,
    mean,
    std,
    min_crop_scale: float = 1.0,
    grayscale_p: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Raw shard sample -> {"image": (3, size, size), "text": (context_length,)}, augmented by ``rng``.

    ``min_crop_scale`` < 1 takes random crops; ``grayscale_p`` turns that share of images grey, so colour alone
    cannot match them to their captions and the model must also learn what the shapes look like.
    """
    img = image_of(sample)
    if min_crop_scale < 1.0:
        img = random_crop(img, rng, min_crop_scale)
    if grayscale_p > 0 and rng.random() < grayscale_p:
        img = img.convert("L").convert("RGB")
    caption = sample["txt"]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else caption
    return {"image": to_tensor(img, size, mean, std), "text": tokenizer([caption])[0]}


def make_clip_map(name: str, min_crop_scale: float = 1.0, grayscale_p: float = 0.0):
    """A picklable map function for :mod:`training.data` that decodes, augments and tokenizes for model ``name``."""
    pre = preprocess_config(model_config(name))
    return functools.partial(
        clip_map,
        tokenizer=get_tokenizer(name),
        size=pre["size"],
        mean=pre["mean"],
        std=pre["std"],
        min_crop_scale=min_crop_scale,
        grayscale_p=grayscale_p,
    )
