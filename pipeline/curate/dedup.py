"""Duplicate removal over the whole dataset: exact (sha256), perceptual hash distance, embedding cosine.

Every function takes the candidates in *keep priority* order (the first is the one to keep: highest CLIP score by
default) and returns ``{dropped index: (kept twin index, detail)}``. Greedy in priority order: a candidate is
dropped when it is a duplicate of one already kept, and the recorded twin is that kept one, so a dropped sample
always points at a sample that stays (within this filter).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def exact_duplicates(sha256: list[str | None]) -> dict[int, tuple[int, str]]:
    """Same image bytes: every later occurrence of a sha256 points at its first (highest priority) one."""
    first: dict[str, int] = {}
    out = {}
    for i, h in enumerate(sha256):
        if not h:
            continue
        if h in first:
            out[i] = (first[h], "same sha256")
        else:
            first[h] = i
    return out


def _bands(bits: int, n_bands: int) -> list[tuple[int, int]]:
    """Split 0..bits into n_bands contiguous (shift, width) bands."""
    edges = np.linspace(0, bits, n_bands + 1).astype(int)
    return [(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def phash_duplicates(phashes: list[str | None], max_distance: int) -> dict[int, tuple[int, str]]:
    """Hashes within ``max_distance`` bits of a kept one (Hamming), found through ``max_distance + 1`` bands.

    By the pigeonhole principle two hashes that differ in at most d bits agree exactly on at least one of d + 1
    bands, so only samples sharing a band value are compared: near-linear instead of all pairs.
    """
    valid = [(i, int(h, 16), len(h) * 4) for i, h in enumerate(phashes) if h]
    if not valid:
        return {}
    bits = valid[0][2]
    bands = _bands(bits, min(max_distance + 1, bits))
    buckets: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)  # (band, value) -> kept (i, hash)
    out = {}
    for i, h, _ in valid:
        best = None
        seen = set()
        for b, (shift, width) in enumerate(bands):
            for j, hj in buckets.get((b, (h >> shift) & ((1 << width) - 1)), ()):
                if j in seen:
                    continue
                seen.add(j)
                d = (h ^ hj).bit_count()
                if d <= max_distance and (best is None or d < best[1]):
                    best = (j, d)
        if best is not None:
            out[i] = (best[0], f"phash distance {best[1]}")
            continue
        for b, (shift, width) in enumerate(bands):
            buckets[(b, (h >> shift) & ((1 << width) - 1))].append((i, h))
    return out


def kmeans(x: np.ndarray, k: int, iters: int = 10, seed: int = 0, sample: int = 100_000) -> np.ndarray:
    """Spherical k-means (cosine) on L2-normalised rows; returns each row's cluster id.

    Fitted on at most ``sample`` rows (k-means++ seeding), then every row is assigned in chunks.
    """
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    fit = x[rng.choice(n, size=min(n, sample), replace=False)] if n > sample else x
    centers = [fit[rng.integers(len(fit))]]
    dist = 1.0 - fit @ centers[0]
    for _ in range(1, k):
        p = np.clip(dist, 0, None) ** 2
        idx = rng.choice(len(fit), p=p / p.sum()) if p.sum() > 0 else rng.integers(len(fit))
        centers.append(fit[idx])
        dist = np.minimum(dist, 1.0 - fit @ fit[idx])
    c = np.stack(centers)
    for _ in range(iters):
        assign = np.argmax(fit @ c.T, axis=1)
        for j in range(k):
            members = fit[assign == j]
            if len(members):
                m = members.sum(0)
                c[j] = m / max(np.linalg.norm(m), 1e-12)
    return np.concatenate([np.argmax(x[s : s + 65536] @ c.T, axis=1) for s in range(0, n, 65536)])


def embedding_duplicates(emb: np.ndarray, threshold: float, n_clusters: int | None = None, seed: int = 0):
    """Rows whose cosine similarity to a kept row of the same k-means cluster is at least ``threshold``.

    SemDeDup-style: cluster first (about sqrt(n) clusters), then compare only within a cluster, so the cost stays
    near-linear in n; a pair split across two clusters is missed, which the method accepts.
    """
    n = len(emb)
    if n < 2:
        return {}
    x = emb.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = n_clusters or max(1, int(round(np.sqrt(n))))
    assign = kmeans(x, k, seed=seed)
    out = {}
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)  # ascending = priority order
        if len(members) < 2:
            continue
        sims = x[members] @ x[members].T
        kept: list[int] = []
        for a in range(len(members)):
            if kept:
                row = sims[a, kept]
                b = int(np.argmax(row))
                if row[b] >= threshold:
                    out[int(members[a])] = (int(members[kept[b]]), f"cosine {row[b]:.4f}")
                    continue
            kept.append(a)
    return out
