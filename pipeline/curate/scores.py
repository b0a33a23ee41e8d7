"""Pass 1 of curation: score every pair of a shard once and store embeddings in clip-retrieval's layout.

```
<embeddings>/img_emb/img_emb_NNNNNN.npy     float16 (n, dim), L2-normalised image embeddings, shard order
<embeddings>/text_emb/text_emb_NNNNNN.npy   float16 (n, dim), caption embeddings, same rows
<embeddings>/metadata/metadata_NNNNNN.parquet  the same rows: key, caption, url, clip_score, tags, sizes, ...
<embeddings>/model.json                     the model, its checkpoint hash and the preprocessing
```

The metadata parquet is written last and marks the shard as scored; a rerun skips it. Thresholds, dedup and
resharding (pass 2) read only these files, so a new threshold needs no new inference.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.curate.pairs import INT_META
from pipeline.curate.scorer import ClipScorer, score_pairs
from pipeline.curate.tags import top_tags
from pipeline.shards import arrow_array, clean_temporaries
from pipeline.stats import StageStats

META_FIELDS = ("url", "page_url", "sha256", "phash", "width", "height", "original_width", "original_height")


def shard_stem(src_url: str) -> str:
    """``.../000012.tar`` -> ``000012``."""
    return src_url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")


def score_files(emb_url: str, stem: str) -> dict[str, str]:
    """URLs of the three pass-1 files of one source shard."""
    return {
        "img": storage.join(emb_url, "img_emb", f"img_emb_{stem}.npy"),
        "text": storage.join(emb_url, "text_emb", f"text_emb_{stem}.npy"),
        "meta": storage.join(emb_url, "metadata", f"metadata_{stem}.parquet"),
    }


SOURCE_KEY = b"altforge.source"  # metadata parquet schema key: the identity of the source shard it scored


def source_identity(src_url: str, storage_options: dict | None = None) -> str:
    """The source shard as stored now: URL (a local path resolved, so ``./src`` and ``/abs/src`` are one input),
    size and modification stamp (mtime, or the object's ETag)."""
    size, stamp = storage.stamp(src_url, storage_options)
    url = os.path.realpath(src_url.removeprefix("file://")) if storage.is_local(src_url) else src_url
    return json.dumps({"url": url, "size": size, "stamp": stamp}, sort_keys=True)


def is_scored(emb_url: str, src_url: str, storage_options: dict | None = None) -> bool:
    """Whether pass 1 finished for this source shard as it is now (a rewritten or other shard is scored again)."""
    import fsspec

    meta = score_files(emb_url, shard_stem(src_url))["meta"]
    if not storage.exists(meta, storage_options):
        return False
    try:
        with fsspec.open(meta, "rb", **(storage_options or {})) as f:
            stored = (pq.read_schema(f).metadata or {}).get(SOURCE_KEY)
    except (OSError, ValueError) as e:  # cut short (an older run killed mid-write): scored again, then replaced
        if storage.is_access_error(e):
            raise
        return False
    return stored is not None and stored.decode() == source_identity(src_url, storage_options)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def decode_workers(cfg, scorer: ClipScorer) -> int:
    """DataLoader workers for decoding: as configured, else none on CPU (the model needs the cores) and 8 on GPU."""
    if cfg.workers is not None:
        return cfg.workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if scorer.device.type == "cuda" else 0


def score_shard(
    src_url: str, emb_url: str, cfg, scorer: ClipScorer, storage_options: dict | None = None
) -> StageStats:
    """Score every pair of the shard ``src_url`` (a CurateSection ``cfg``) and write its pass-1 files."""
    stats = StageStats()
    identity = source_identity(src_url, storage_options)  # before reading: a shard rewritten meanwhile rescores
    with stats.timer("score"):
        rows, img, txt, scores = score_pairs(
            src_url, scorer, cfg.batch_size, decode_workers(cfg, scorer), storage_options
        )
    labels = tuple(cfg.tags)
    tags = [None] * len(rows)
    if labels:  # a sample without an image (or a score) gets no tags: its zero embedding would still get some
        found = top_tags(img, scorer.label_embeddings(labels), scorer.logit_scale(), labels, cfg.tag_top_k)
        tags = [json.dumps(t) if np.isfinite(sc) else None for t, sc in zip(found, scores, strict=True)]
    stem = shard_stem(src_url)
    table = {
        "key": arrow_array([r["key"] for r in rows], pa.string()),
        "shard": arrow_array([stem] * len(rows), pa.string()),
        "caption": arrow_array([r["caption"] for r in rows], pa.string()),
        "clip_score": pa.array(scores, pa.float32()),
        "error": arrow_array([r["error"] for r in rows], pa.string()),
    }
    for f in META_FIELDS:
        table[f] = arrow_array([r["meta"].get(f) for r in rows], pa.int64() if f in INT_META else pa.string())
    table["tags"] = arrow_array(tags, pa.string())
    files = score_files(emb_url, stem)
    storage.write_bytes(files["img"], _npy_bytes(img.astype(np.float16)), storage_options)
    storage.write_bytes(files["text"], _npy_bytes(txt.astype(np.float16)), storage_options)
    buf = io.BytesIO()
    pq.write_table(pa.table(table).replace_schema_metadata({SOURCE_KEY: identity.encode()}), buf, compression="zstd")
    # last: the "scored" marker, never half written
    storage.write_whole(files["meta"], buf.getvalue(), storage_options)
    stats.seen = len(rows)
    stats.kept = int(np.sum(~np.isnan(scores)))
    stats.drop("decode_error", stats.seen - stats.kept)
    return stats


def prepare_embeddings(emb_url: str, scorer: ClipScorer, cfg, storage_options: dict | None = None) -> dict:
    """Write ``model.json`` (model id, weights, sha256, preprocessing, labels); returns it.

    Scores already stored by another model (or other zero-shot labels) are stale: their shards are marked
    unscored so pass 1 computes them again.
    """
    record = {**scorer.provenance(), "preprocess_cfg": scorer.preprocess, "tags": list(cfg.tags)}
    record["tag_top_k"] = cfg.tag_top_k
    record = json.loads(json.dumps(record))  # tuples as lists, as read back
    url = storage.join(emb_url, "model.json")
    meta_dir = storage.join(emb_url, "metadata")
    for folder in (emb_url, meta_dir):  # what a write_whole killed before its rename left
        if storage.is_local(folder):
            clean_temporaries(folder, storage_options)
    if storage.exists(url, storage_options):
        if _read_record(url, storage_options) == record:
            return record  # unchanged: not rewritten, so a kill now cannot harm it
        # another model, or a record that cannot be read (which model scored them is unknown)
        for name in storage.listdir(meta_dir, storage_options):
            storage.remove(storage.join(meta_dir, name), storage_options)
    storage.write_whole(url, json.dumps(record, indent=2).encode(), storage_options)
    return record


def _read_record(url: str, storage_options: dict | None = None) -> dict | None:
    """The stored model record, or None when it is not valid JSON (cut short by an older run killed mid-write)."""
    try:
        return json.loads(storage.read_bytes(url, storage_options))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


def read_scores(emb_url: str, stems: list[str], storage_options: dict | None = None):
    """All pass-1 rows of ``stems`` (in that order) as one DataFrame, plus the stacked float32 image embeddings."""
    import pandas as pd

    frames, embs = [], []
    for stem in stems:
        files = score_files(emb_url, stem)
        meta = io.BytesIO(storage.read_bytes(files["meta"], storage_options))
        frames.append(pq.read_table(meta, use_threads=False).to_pandas())
        embs.append(np.load(io.BytesIO(storage.read_bytes(files["img"], storage_options))).astype(np.float32))
    if not frames:
        return pd.DataFrame(columns=["key", "shard", "caption", "clip_score"]), np.zeros((0, 1), np.float32)
    return pd.concat(frames, ignore_index=True), np.concatenate(embs)
