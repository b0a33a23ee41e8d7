"""The global decisions between the passes: every filter in a recorded order, over the whole dataset at once.

Order: basic filters (cheap, per sample), exact dedup, perceptual-hash dedup, embedding dedup, then the CLIP score
filter. Dedup runs before the score cut so that a kept fraction is a share of distinct samples, and each filter
sees only what the earlier ones left. For the funnel every filter is also run alone on all samples, which shows
how much the filters overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.curate import dedup
from pipeline.curate.filters import basic_filters, fraction_threshold

# Without --min-score or --keep-fraction: keep the best 80% of the distinct samples that pass the basic filters.
# On the demo site (20% mismatched alt text) this removes mismatches at precision and recall >= 0.9; see README.
DEFAULT_KEEP_FRACTION = 0.8
SCORE_REASON = "low_clip_score"


@dataclass
class Selection:
    """What happens to every sample (row order of the score table), and why."""

    status: np.ndarray  # object array: "success" or the drop reason
    duplicate_of: np.ndarray  # object array: key of the kept twin for duplicate drops, else None
    detail: np.ndarray  # object array: human-readable detail of the decision (distance, score vs cut), or None
    order: list[str]  # filter names in the order they were applied
    threshold: float  # the CLIP score cut actually applied (cosine similarity)
    rule: dict  # how the cut was chosen: {"min_score": x} or {"keep_fraction": f, "pool": n}
    funnel: list[dict] = field(default_factory=list)  # per filter: reason, alone, dropped, remaining
    overlap: dict = field(default_factory=dict)  # reason -> reason -> samples both would drop on their own
    clusters: list[dict] = field(default_factory=list)  # duplicate sets: kind, kept, members [{key, detail}]

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of the kept samples."""
        return self.status == "success"


def priority(scores: np.ndarray, keys: np.ndarray, rule: str) -> np.ndarray:
    """Row indices in keep-priority order: highest CLIP score first (NaN last, ties by key), or by key."""
    if rule == "first_key":
        return np.argsort(keys, kind="stable")
    s = np.where(np.isfinite(scores), scores, -np.inf)
    return np.lexsort((keys, -s))


def _dedup_runs(table, img_emb: np.ndarray, cfg) -> list[tuple[str, object]]:
    """(reason, fn(ordered row indices) -> {row: (twin row, detail)}) for each enabled dedup kind."""
    runs = []
    sha = table["sha256"].to_numpy(object) if "sha256" in table else np.full(len(table), None, object)
    ph = table["phash"].to_numpy(object) if "phash" in table else np.full(len(table), None, object)

    def remap(idx, found):
        return {int(idx[a]): (int(idx[b]), d) for a, (b, d) in found.items()}

    if cfg.dedup.exact:
        runs.append(("exact_duplicate", lambda idx: remap(idx, dedup.exact_duplicates(list(sha[idx])))))
    if cfg.dedup.phash_distance is not None:
        d = cfg.dedup.phash_distance
        runs.append(("near_duplicate_phash", lambda idx: remap(idx, dedup.phash_duplicates(list(ph[idx]), d))))
    if cfg.dedup.embedding_threshold is not None:
        t = cfg.dedup.embedding_threshold
        runs.append(("near_duplicate_embedding", lambda idx: remap(idx, dedup.embedding_duplicates(img_emb[idx], t))))
    return runs


def _resolve_twins(keys, twin: np.ndarray, detail: np.ndarray, clusters: list[dict]) -> None:
    """Point every dropped duplicate at the member of its set that stayed (a twin may be a later dedup's drop).

    B a copy of A and A a near-duplicate of C: B's twin becomes C ("same sha256, via A"), and A's cluster names C.
    """
    index = {k: i for i, k in enumerate(keys)}

    def final(i: int) -> int:
        seen = {i}
        while twin[i] is not None and index[twin[i]] not in seen:
            i = index[twin[i]]
            seen.add(i)
        return i

    for i in range(len(keys)):
        if twin[i] is not None:
            end = final(index[twin[i]])
            if keys[end] != twin[i]:
                detail[i], twin[i] = f"{detail[i]}, via {twin[i]}", keys[end]
    for c in clusters:
        end = keys[final(index[c["kept"]])]
        if end != c["kept"]:  # the members' detail says which twin they copy, as the parquet's does
            c["members"] = [{**m, "detail": f"{m['detail']}, via {c['kept']}"} for m in c["members"]]
        c["kept"] = end


def select(table, img_emb: np.ndarray, cfg, detect_language=None) -> Selection:
    """Decide every sample of the score table (a CurateSection ``cfg``); ``img_emb`` rows align with the table."""
    n = len(table)
    keys = table["key"].to_numpy(str)
    scores = table["clip_score"].to_numpy(np.float32)
    rows = table.to_dict("records")
    order_idx = priority(scores, keys, cfg.dedup_keep)
    status = np.full(n, "success", object)
    twin = np.full(n, None, object)
    detail = np.full(n, None, object)
    alive = np.ones(n, bool)
    alone: dict[str, np.ndarray] = {}
    funnel = []
    clusters = []

    def apply(reason: str, own: np.ndarray, in_order: np.ndarray) -> None:
        nonlocal alive
        alone[reason] = own
        earlier = int((own & ~alive).sum())  # would drop these alone, but an earlier filter already did
        drop = in_order & alive
        status[drop] = reason
        alive = alive & ~drop
        funnel.append({"reason": reason, "alone": int(own.sum()), "dropped": int(drop.sum()),
                       "remaining": int(alive.sum()), "caught_earlier": earlier})  # fmt: skip

    for reason, fn in basic_filters(cfg, detect_language):
        mask = np.fromiter((bool(fn(r)) for r in rows), bool, n)
        apply(reason, mask, mask)

    valid = np.isfinite(scores)  # NaN (no image, a broken model) or inf never passes the cut nor fills its pool
    for reason, run in _dedup_runs(table, img_emb, cfg):
        own = np.zeros(n, bool)
        own[list(run(order_idx[valid[order_idx]]))] = True
        found = run(order_idx[alive[order_idx]])
        in_order = np.zeros(n, bool)
        in_order[list(found)] = True
        apply(reason, own, in_order)
        by_twin: dict[int, list] = {}
        for i, (j, d) in found.items():
            twin[i], detail[i] = keys[j], d
            by_twin.setdefault(j, []).append({"key": keys[i], "detail": d})
        clusters += [{"kind": reason, "kept": keys[j], "members": m} for j, m in sorted(by_twin.items())]
    _resolve_twins(keys, twin, detail, clusters)

    if cfg.min_score is not None:
        cut, cut_alone = float(cfg.min_score), float(cfg.min_score)
        rule = {"min_score": cut}
    else:
        frac = cfg.keep_fraction if cfg.keep_fraction is not None else DEFAULT_KEEP_FRACTION
        cut = fraction_threshold(scores[alive & valid], frac)
        cut_alone = fraction_threshold(scores[valid], frac)
        rule = {"keep_fraction": frac, "pool": int((alive & valid).sum()), "default": cfg.keep_fraction is None}
    low = alive & ~(valid & (scores >= cut))  # not ">= cut" (NaN compares false) is a drop
    apply(SCORE_REASON, valid & ~(scores >= cut_alone), low)
    for i in np.flatnonzero(status == SCORE_REASON):
        detail[i] = f"score {scores[i]:.4f} < cut {cut:.4f}" if valid[i] else f"score {scores[i]} is not finite"
    order = [f["reason"] for f in funnel]
    overlap = {a: {b: int((alone[a] & alone[b]).sum()) for b in order} for a in order}
    return Selection(status, twin, detail, order, cut, rule, funnel, overlap, clusters)
