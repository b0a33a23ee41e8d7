"""Pass 2 of curation: the kept samples into new shards of even size, every input sample as one parquet row.

The decisions table (one row per input sample, in source order) is cut into contiguous spans, one per output
shard, each holding an even share of the kept samples; a dropped sample's row goes to the shard of the span it
falls in. Each output shard is written by :func:`curate_shard` independently, so pass 2 runs one task per output
shard and a rerun skips the shards already done.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq

from pipeline import shards, storage
from pipeline.curate.scores import META_FIELDS
from pipeline.stats import StageStats

DECISIONS = "decisions.parquet"


def plan_spans(kept: np.ndarray, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` row spans, one per output shard, with kept counts differing by at most one."""
    n_rows, n_kept = len(kept), int(kept.sum())
    n_out = max(1, math.ceil(n_kept / shard_size))
    sizes = [n_kept // n_out + (1 if j < n_kept % n_out else 0) for j in range(n_out)]
    kept_pos = np.flatnonzero(kept)
    spans, start, done = [], 0, 0
    for j, size in enumerate(sizes):
        done += size
        end = n_rows if j == n_out - 1 else int(kept_pos[done - 1]) + 1
        spans.append((start, end))
        start = end
    return spans


def decisions_url(dst_url: str) -> str:
    """Where the flow stores the global decisions between the passes."""
    return storage.join(dst_url, DECISIONS)


def write_decisions(dst_url: str, table, storage_options: dict | None = None) -> None:
    """Store the decisions table (score table + status, duplicate_of, detail, out_shard) as one parquet file."""
    buf = io.BytesIO()
    table.to_parquet(buf, index=False, compression="zstd")
    storage.write_bytes(decisions_url(dst_url), buf.getvalue(), storage_options)


def read_decisions(dst_url: str, out_shard: int | None = None, storage_options: dict | None = None):
    """The decisions table, or only the rows of one output shard."""
    data = storage.read_bytes(decisions_url(dst_url), storage_options)
    filters = [("out_shard", "=", out_shard)] if out_shard is not None else None
    return pq.read_table(io.BytesIO(data), filters=filters, use_threads=False).to_pandas()


def _none(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def curate_shard(
    src_urls: dict[str, str], dst_url: str, rows, provenance: dict, storage_options: dict | None = None
) -> StageStats:
    """Write output shard ``dst_url`` from its decision ``rows`` (a DataFrame), reading the source shards named
    in ``rows.shard`` (stem -> URL in ``src_urls``); kept samples get their scores in ``.json``."""
    base, _, name = dst_url.rstrip("/").rpartition("/")
    index = int(name.removesuffix(".tar"))
    recs = [{k: _none(v) for k, v in r.items()} for r in rows.to_dict("records")]
    by_key = {r["key"]: r for r in recs}
    stats = StageStats(seen=len(recs))
    written = set()
    with shards.ShardWriter(base, index, storage_options) as writer:
        for stem in dict.fromkeys(r["shard"] for r in recs):
            for sample in shards.iter_samples(src_urls[stem], storage_options, decode=False):
                r = by_key.get(shards.without_lone_surrogates(sample["__key__"]))  # as the score table has it
                if r is None or r["status"] != "success":
                    continue
                meta = json.loads(sample["json"]) if "json" in sample else {}
                meta.update(_scores(r, provenance))
                out = {k: v for k, v in sample.items() if k not in ("__url__", "json")}
                out["json"] = meta
                writer.write(out)
                written.add(r["key"])
        for r in recs:
            status = r["status"]
            if status == "success" and r["key"] not in written:
                status = "missing_from_source"  # the source shard changed between the passes
            if status == "success":
                stats.kept += 1
            else:
                stats.drop(status)
            writer.add_row(_row(r, status, provenance))
        writer.publish(stats)
    return stats


def _scores(r: dict, provenance: dict) -> dict:
    tags = json.loads(r["tags"]) if r.get("tags") else None
    return {"clip_score": r["clip_score"], **provenance, **({"tags": tags} if tags is not None else {})}


def _row(r: dict, status: str, provenance: dict) -> dict:
    row = {f: r.get(f) for f in META_FIELDS if f != "phash"}
    row.update(
        key=r["key"],
        caption=r.get("caption"),
        status=status,
        error=r.get("error") or r.get("detail"),
        duplicate_of=r.get("duplicate_of"),
        source_shard=r.get("shard"),
        phash=r.get("phash"),
        clip_score=r.get("clip_score"),
        tags=r.get("tags"),
        **provenance,
    )
    for f in ("width", "height", "original_width", "original_height"):
        row[f] = None if row[f] is None else int(row[f])
    return row
