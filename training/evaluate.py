"""CLIP evaluation: zero-shot classification from class names x prompt templates, and retrieval recall@k."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from pipeline.shards import iter_samples, shard_urls


@dataclass(frozen=True)
class ZeroShotTask:
    """A labelled zero-shot task: each image's label comes from its sample metadata via ``label_of``."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]  # "{}" marks the class name; embeddings are averaged over templates
    label_of: Callable[[dict], str | None]  # sample .json -> class name, or None to leave the sample out


def _single_shape(meta, field: str) -> str | None:
    """``field`` of the one shape in ``meta["attributes"]["shapes"]``; None for two shapes, or metadata of another
    form (``"attributes": null``, a list, a missing field): the sample is left out of the task, not a crash."""
    attributes = meta.get("attributes") if isinstance(meta, dict) else None
    shapes = attributes.get("shapes") if isinstance(attributes, dict) else None
    if not isinstance(shapes, list) or len(shapes) != 1 or not isinstance(shapes[0], dict):
        return None
    value = shapes[0].get(field)
    return value if isinstance(value, str) else None


def demo_colour(meta: dict) -> str | None:
    """The colour of a one-shape demo scene (None for two-shape scenes)."""
    return _single_shape(meta, "colour")


def demo_shape(meta: dict) -> str | None:
    """The shape of a one-shape demo scene (None for two-shape scenes)."""
    return _single_shape(meta, "shape")


def demo_tasks() -> list[ZeroShotTask]:
    """Colour and shape zero-shot on the demo site's one-shape scenes, labelled by the generator's attributes.

    Each class is prompted in the captions' own words and averaged over the other attribute's values (the
    usual prompt ensemble); no image label enters the prompts.
    """
    from pipeline.demo_site import COLOURS, SHAPES

    colour_t = ("a {} shape", *(f"a {{}} {s}" for s in SHAPES))
    shape_t = ("a {}", *(f"a {c} {{}}" for c in COLOURS))
    return [
        ZeroShotTask("colour", tuple(COLOURS), colour_t, demo_colour),
        ZeroShotTask("shape", tuple(SHAPES), shape_t, demo_shape),
    ]


@dataclass
class EvalSet:
    """Decoded held-out samples: image tensors, captions, metadata."""

    images: torch.Tensor  # (n, 3, h, w), model-normalised
    captions: list[str]
    metas: list[dict]
    errors: Counter


def load_eval_set(
    source: str, map_image: Callable[[dict], torch.Tensor], limit: int = 2000, storage_options: dict | None = None
) -> EvalSet:
    """Read up to ``limit`` samples of held-out shards; ``map_image`` turns a raw sample into an image tensor.

    Bad samples are skipped and counted in ``errors`` as the training loader does (``missing_field``,
    ``decode_error``: undecodable or truncated images, decompression bombs, unreadable metadata; ``corrupt_shard``).
    ``storage_options``: fsspec options for remote shards (the training data's endpoint).
    """
    images, captions, metas, errors = [], [], [], Counter()
    for url in sorted(shard_urls(source, storage_options)):
        for s in iter_samples(url, storage_options, decode=False, errors=errors):
            try:
                img = map_image(s)
                caption = s["txt"].decode("utf-8")
                meta = json.loads(s["json"]) if "json" in s else {}
            except KeyError:
                errors["missing_field"] += 1
                continue
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):  # EOFError: cut image
                errors["decode_error"] += 1
                continue
            images.append(img)
            captions.append(caption)
            metas.append(meta)
            if len(images) >= limit:
                return EvalSet(torch.stack(images), captions, metas, errors)
    if not images:
        raise ValueError(f"no evaluation samples in {source} ({dict(errors) or 'no samples'})")
    return EvalSet(torch.stack(images), captions, metas, errors)


@torch.no_grad()
def encode_images(model, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings (float32, on CPU)."""
    out = [
        model.encode_image(images[i : i + batch_size].to(device), normalize=True).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (float32, on CPU)."""
    out = [
        model.encode_text(tokenizer(texts[i : i + batch_size]).to(device), normalize=True).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out)


def class_embeddings(model, tokenizer, classnames, templates, device) -> torch.Tensor:
    """(classes, d) zero-shot weights: each class's template embeddings averaged and renormalised."""
    rows = []
    for name in classnames:
        emb = encode_texts(model, tokenizer, [t.format(name) for t in templates], device).mean(0)
        rows.append(emb / emb.norm())
    return torch.stack(rows)


def zero_shot_accuracy(image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose most similar class embedding is their label (``labels`` are class indices)."""
    pred = (image_features @ class_features.T).argmax(dim=1)
    return float((pred == labels).float().mean())


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@k where image i and text i are the pair."""
    sim = image_features @ text_features.T
    n = sim.shape[0]
    target = torch.arange(n)
    out = {}
    for direction, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        # rank of the true partner = how many candidates score strictly higher
        rank = (s > s[target, target].unsqueeze(1)).sum(dim=1)
        for k in ks:
            out[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return out


def evaluate_clip(model, tokenizer, data: EvalSet, tasks: list[ZeroShotTask], device) -> dict[str, float]:
    """Zero-shot accuracy of every task plus retrieval recall on the pairs; chance levels included."""
    was_training = model.training
    model.eval()
    try:
        img = encode_images(model, data.images, device)
        txt = encode_texts(model, tokenizer, data.captions, device)
        metrics = retrieval_recall(img, txt)
        metrics["retrieval_pairs"] = len(data.captions)
        for task in tasks:
            index = {c: i for i, c in enumerate(task.classnames)}
            labels = [task.label_of(m) for m in data.metas]
            keep = [i for i, lab in enumerate(labels) if lab in index]  # None, or a class the task does not have
            if not keep:
                continue
            y = torch.tensor([index[labels[i]] for i in keep])
            cls = class_embeddings(model, tokenizer, task.classnames, task.templates, device)
            metrics[f"zeroshot_{task.name}"] = zero_shot_accuracy(img[keep], cls, y)
            metrics[f"zeroshot_{task.name}_n"] = len(keep)
            metrics[f"zeroshot_{task.name}_chance"] = 1.0 / len(task.classnames)
        return metrics
    finally:
        model.train(was_training)
