"""Small real open_clip models and datasets for the curation tests."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from pipeline.recipe import CurateSection
from pipeline.shards import ShardWriter
from pipeline.stats import StageStats

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(out_dir: str, seed: int = 0) -> str:
    """A randomly initialised tiny open_clip model saved as a local-dir (config + safetensors); returns the dir."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CFG)
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(out_dir, "open_clip_model.safetensors"),
    )
    pre = {
        "size": 32,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": TINY_CFG, "preprocess_cfg": pre}, f)
    return out_dir


def jpeg(rgb, size=(40, 40), noise_seed: int | None = None) -> bytes:
    """A JPEG of a flat colour (plus optional noise so images differ)."""
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(rgb, np.uint8)
    if noise_seed is not None:
        arr = np.clip(arr + np.random.default_rng(noise_seed).integers(-60, 60, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_dataset(root: str, shards: list[list[dict]]) -> str:
    """Write scraped-style shards: each sample {key, jpg, caption, sha256?, phash?, width?, height?}."""
    import hashlib

    from pipeline.images import phash

    for index, samples in enumerate(shards):
        with ShardWriter(root, index) as w:
            for s in samples:
                img = s["jpg"]
                try:
                    with Image.open(io.BytesIO(img)) as im:
                        ph = s.get("phash") or phash(im)
                        width, height = im.size
                except OSError:  # a planted broken image
                    ph, width, height = None, 0, 0
                meta = {
                    "url": f"http://example.invalid/{s['key']}.jpg",
                    "caption": s["caption"],
                    "sha256": s.get("sha256") or hashlib.sha256(img).hexdigest(),
                    "phash": ph,
                    "width": width,
                    "height": height,
                    "original_width": s.get("original_width", width),
                    "original_height": s.get("original_height", height),
                }
                w.write({"__key__": s["key"], "jpg": img, "txt": s["caption"], "json": meta})
                w.add_row({"key": s["key"], "status": "success", "caption": s["caption"]})
            w.publish(StageStats(seen=len(samples), kept=len(samples)))
    return root


COLS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (200, 200, 30)]


def cfg(model: str, **kw) -> CurateSection:
    base = {"clip": {"model": model}, "keep_fraction": 1.0, "workers": 0, "batch_size": 8, "report": False,
            "dedup": {"exact": True, "phash_distance": None, "embedding_threshold": None}}  # fmt: skip
    return CurateSection.model_validate({**base, **kw})
