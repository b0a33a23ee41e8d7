"""The CLIP scorer: an open_clip model loaded once per worker, and batched pair scoring of one shard.

A model is named the ways open_clip users expect: an architecture plus a pretrained tag (``ViT-B-32`` +
``laion2b_s34b_b79k``), an architecture plus a checkpoint file (``pretrained=/path/weights.safetensors``), or a
directory with ``open_clip_config.json`` and weights (``local-dir:RUN`` or just ``RUN``, what our trainer exports).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError

from pipeline.curate.pairs import model_batches
from pipeline.shards import sha256_file

NON_FINITE_ERROR = "non-finite CLIP score"  # the error text of a pair the model scored NaN or inf
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")


@dataclass
class ClipScorer:
    """An open_clip model in eval mode with its transform, tokenizer and a record of where it came from."""

    model: torch.nn.Module
    transform: object  # PIL image -> (3, H, W) tensor (open_clip's eval transform)
    tokenizer: object  # list[str] -> (n, context_length) token ids
    device: torch.device
    model_id: str  # what was asked for: architecture name or local-dir:PATH
    pretrained: str | None  # pretrained tag or checkpoint path (None: random init)
    checkpoint_sha256: str | None  # sha256 of the weights file, when there is one on disk
    preprocess: dict  # open_clip preprocess config: size, mean, std, interpolation, resize_mode
    _labels: dict = field(default_factory=dict)  # label tuple -> (n_labels, dim) embeddings

    def provenance(self) -> dict:
        """How a score was made: the columns stored beside every ``clip_score``."""
        return {
            "clip_model": self.model_id,
            "clip_pretrained": self.pretrained,
            "clip_checkpoint_sha256": self.checkpoint_sha256,
            "clip_preprocess": preprocess_string(self.preprocess),
        }

    def autocast(self):
        """bf16 (or fp16) autocast on GPU; nothing on CPU, where fp32 is both exact and fastest."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 image and text embeddings of a batch (on the CPU)."""
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = self.tokenizer(texts).to(self.device, non_blocking=True)
        with self.autocast():
            img = self.model.encode_image(images)
            txt = self.model.encode_text(tokens)
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return img.cpu(), txt.cpu()

    @torch.inference_mode()
    def label_embeddings(self, labels: tuple[str, ...]) -> torch.Tensor:
        """L2-normalised text embeddings of zero-shot labels (cached per label list)."""
        if labels not in self._labels:
            tokens = self.tokenizer(list(labels)).to(self.device)
            with self.autocast():
                emb = self.model.encode_text(tokens)
            self._labels[labels] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu()
        return self._labels[labels]

    def logit_scale(self) -> float:
        """The model's learned softmax temperature (exp of its logit scale), used for tag probabilities."""
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().exp()) if scale is not None else 100.0


def preprocess_string(p: dict) -> str:
    """A one-line description of the preprocessing, e.g. ``resize shortest 224 bicubic, center crop, mean ..``."""
    mean = ",".join(f"{x:.4f}" for x in p.get("mean", ()))
    std = ",".join(f"{x:.4f}" for x in p.get("std", ()))
    size = p.get("size")
    crop = "" if p.get("resize_mode") == "squash" else f", center crop {size}"  # squash: no crop, ratio not kept
    resize = f"resize {p.get('resize_mode', 'shortest')} {size} {p.get('interpolation', 'bicubic')}"
    return f"{resize}{crop}, mean {mean}, std {std}"


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are
    taken as given. ``ValueError`` (one line) for anything else, or a GPU this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: no such CUDA device on this machine")
    return torch.device(device)


def _local_dir(model: str) -> str | None:
    path = model.removeprefix("local-dir:")
    if model.startswith("local-dir:") or os.path.isfile(os.path.join(path, "open_clip_config.json")):
        return path
    return None


def load_scorer(model: str, pretrained: str | None = None, device: str = "auto") -> ClipScorer:
    """Load an open_clip model for scoring: ``(name, tag)``, ``(name, checkpoint path)`` or a local dir.

    Raises ``ValueError`` with one line when the model cannot be found (an unknown name, a missing file, a tag that
    needs a download this machine cannot make).
    """
    import open_clip

    dev = resolve_device(device)
    local = _local_dir(model)
    checkpoint = None
    try:
        if local is not None:
            if not os.path.isfile(os.path.join(local, "open_clip_config.json")):
                raise ValueError(f"{local}: not an open_clip model directory (no open_clip_config.json)")
            if not any(os.path.isfile(os.path.join(local, f)) for f in WEIGHT_FILES):  # open_clip would start random
                raise ValueError(f"{local}: open_clip model directory without weights ({', '.join(WEIGHT_FILES)})")
            name = "local-dir:" + os.path.abspath(local)
            net, _, transform = open_clip.create_model_and_transforms(name, device=dev)
            tokenizer = open_clip.get_tokenizer(name)
            checkpoint = next(
                (os.path.join(local, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(local, f))), None
            )
            model_id, pretrained = name, checkpoint
        else:
            if pretrained and not open_clip.get_pretrained_cfg(model, pretrained) and not os.path.isfile(pretrained):
                raise ValueError(f"{model}: {pretrained!r} is neither a pretrained tag of this model nor a file")
            net, _, transform = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=dev)
            tokenizer = open_clip.get_tokenizer(model)
            checkpoint = pretrained if pretrained and os.path.isfile(pretrained) else None
            model_id = model
    except (RuntimeError, OSError, SafetensorError) as e:  # missing, truncated or foreign weights
        why = str(e).splitlines()[0].split(" Available: ")[0]  # open_clip appends every model name it knows
        raise ValueError(f"cannot load CLIP model {model!r} (pretrained={pretrained!r}): {why}") from e
    net.eval()
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return ClipScorer(
        model=net,
        transform=transform,
        tokenizer=tokenizer,
        device=dev,
        model_id=model_id,
        pretrained=pretrained,
        checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None,
        preprocess=dict(open_clip.get_model_preprocess_cfg(net)),
    )


def score_pairs(url: str, scorer: ClipScorer, batch_size: int, workers: int, storage_options: dict | None = None):
    """Score every pair of a shard: rows in shard order, float32 image/text embeddings aligned to them, scores.

    A sample whose image does not decode gets zero embeddings, a NaN score and its error in ``error``; a pair the
    model scores NaN or infinite gets a NaN score and a ``non-finite CLIP score`` error.
    """
    items = []  # (index, row, img_vec | None, txt_vec | None)
    passes = contextlib.closing(model_batches(url, scorer, batch_size, workers, storage_options))
    with passes as batches:  # closed at once on an error, so the persistent loader is free for the retry
        for batch, images in batches:
            img = txt = None
            if images is not None:
                img, txt = scorer.encode(images, [it[3] for it in batch if it[2]])
            j = 0
            for index, key, has_image, caption, meta, error in batch:
                if index < 0:
                    raise ValueError(f"{url}: {error} (a corrupt or truncated shard; repair or remove it)")
                row = {"key": key, "caption": caption, "meta": meta, "error": error}
                if not has_image:
                    items.append((index, row, None, None))
                else:
                    items.append((index, row, img[j].numpy(), txt[j].numpy()))
                    j += 1
    items.sort(key=lambda t: t[0])
    dim = next((t[2].shape[0] for t in items if t[2] is not None), None) or _embed_dim(scorer)
    zero = np.zeros(dim, np.float32)
    img_all = np.stack([zero if t[2] is None else t[2] for t in items]) if items else np.zeros((0, dim), np.float32)
    txt_all = np.stack([zero if t[3] is None else t[3] for t in items]) if items else np.zeros((0, dim), np.float32)
    valid = np.array([t[2] is not None for t in items], bool)
    with np.errstate(invalid="ignore", over="ignore"):
        scores = np.where(valid, (img_all * txt_all).sum(1), np.nan).astype(np.float32)
    rows = [t[1] for t in items]
    for i in np.flatnonzero(valid & ~np.isfinite(scores)):  # a broken model (NaN weights) must not pass every cut
        rows[i]["error"] = f"{NON_FINITE_ERROR} ({scores[i]})"
        scores[i] = np.nan
    return rows, img_all, txt_all, scores


def _embed_dim(scorer: ClipScorer) -> int:
    return int(scorer.label_embeddings(("a",)).shape[1])
