"""Zero-shot tags: each image's most likely labels (from the recipe) with their softmax probabilities."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import torch


def top_tags(
    img_emb: np.ndarray, label_emb: torch.Tensor, logit_scale: float, labels: tuple[str, ...], k: int
) -> list[list[dict]]:
    """Per image: the ``k`` labels with the highest probability, ``[{"label", "p"}]`` (p from a softmax over all)."""
    if len(img_emb) == 0:
        return []
    logits = logit_scale * torch.from_numpy(np.ascontiguousarray(img_emb, np.float32)) @ label_emb.T
    probs = logits.softmax(dim=-1)
    p, idx = probs.topk(min(k, len(labels)), dim=-1)
    return [
        [{"label": labels[j], "p": round(float(q), 4)} for q, j in zip(pr.tolist(), ix.tolist(), strict=True)]
        for pr, ix in zip(p, idx, strict=True)
    ]


def tag_distribution(tags_json: list[str | None]) -> Counter:
    """How many samples have each label as their top tag (``tags_json`` as stored in the parquet)."""
    out: Counter = Counter()
    for t in tags_json:
        if isinstance(t, str) and t:  # None (or NaN in pandas): a sample without an image has no tags
            top = json.loads(t)
            if top:
                out[top[0]["label"]] += 1
    return out
