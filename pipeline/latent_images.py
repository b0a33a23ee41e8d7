"""The latent stage's image side: one source shard's samples decoded, resized and batched for the VAE."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline import shards, storage
from pipeline.images import prepare_image
from pipeline.shards import first_image

if TYPE_CHECKING:
    from pipeline.latents import EncodeConfig


def to_model_input(images: torch.Tensor, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) in [-1, 1] on ``device`` in ``dtype``, channels_last (uint8 travels)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory is NCHW channels_last already
    x = x.float().div_(127.5).sub_(1.0).to(dtype)
    return x.contiguous(memory_format=torch.channels_last)


def decode_sample(sample: dict, resolution: int, min_size: int = 0) -> dict:
    """Raw tar sample -> ``{key, caption, meta, image (uint8 or None), info, status, error}`` (never raises)."""
    key = sample["__key__"]
    caption = sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else ""
    out = {"key": key, "caption": caption, "meta": {}, "image": None, "info": None, "status": "success", "error": None}
    try:
        out["meta"] = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError as e:
        out["error"] = f"bad json: {e}"[:200]  # kept: the metadata is not needed to train
    if not isinstance(out["meta"], dict):
        out["meta"], out["error"] = {}, f"bad json: a {type(out['meta']).__name__}, not an object"
    data = first_image(sample)
    if data is None:
        return {**out, "status": "missing_image"}
    if not caption:
        return {**out, "status": "missing_caption"}
    try:
        image, info = prepare_image(data, resolution)
    except Exception as e:  # any undecodable image is one dropped sample, never a failed shard
        return {**out, "status": "decode_error", "error": f"{type(e).__name__}: {e}"[:200]}
    if min(info["source_size"]) < min_size:
        return {**out, "info": info, "status": "image_too_small", "error": f"source {info['source_size']}"}
    return {**out, "image": image, "info": info}


class ShardImages(torch.utils.data.IterableDataset):
    """The decoded samples of one local tar shard, split over DataLoader workers by position (i % n)."""

    def __init__(self, path: str, resolution: int, min_size: int = 0):
        self.path, self.resolution, self.min_size = path, resolution, min_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        for i, sample in enumerate(shards.iter_samples(self.path, decode=False)):
            if i % n == wid:
                yield {"index": i, **decode_sample(sample, self.resolution, self.min_size)}


def collate_images(items: list[dict]) -> dict:
    """A batch: the decoded images stacked as one uint8 (k, H, W, 3) tensor (pinnable), and every item's record."""
    ok = [it["image"] for it in items if it["image"] is not None]  # exactly the items with status "success"
    for it in items:
        del it["image"]
    images = torch.from_numpy(np.stack(ok)) if ok else torch.zeros(0, dtype=torch.uint8)
    return {"images": images, "items": items}


def decode_workers(cfg: EncodeConfig, device: torch.device) -> int:
    """DataLoader workers: as configured, else none on CPU (the VAE needs the cores) and up to 8 on GPU."""
    if cfg.workers is not None:
        return cfg.workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def image_batches(path: str, cfg: EncodeConfig, device: torch.device) -> Iterator[dict]:
    """Batches of one local shard, decoded in DataLoader workers (pinned memory when the VAE is on a GPU)."""
    workers = decode_workers(cfg, device)
    loader = torch.utils.data.DataLoader(
        ShardImages(path, cfg.resolution, cfg.min_size),
        batch_size=cfg.batch_size,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    batches = iter(loader)
    try:
        yield from batches
    finally:  # on an error too: a failed iterator kept alive by its traceback would stop its workers much later,
        shutdown = getattr(batches, "_shutdown_workers", None)  # from a forked child (a traceback on stderr)
        if shutdown is not None:
            shutdown()


@contextlib.contextmanager
def local_copy(url: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local path of ``url``: itself when local, else a temporary download (decode workers each read it)."""
    if storage.is_local(url):
        yield url.removeprefix("file://")
        return
    fd, path = tempfile.mkstemp(prefix="altforge-src-", suffix=".tar")
    os.close(fd)
    try:
        fs, remote = storage.get_fs(url, storage_options)
        fs.get_file(remote, path)
        yield path
    finally:
        os.remove(path)
