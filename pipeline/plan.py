"""Input plans: a scrape's records cut into fixed partitions, written once, so every rerun maps shards identically.

``<dataset>/_inputs/NNNNNN.parquet`` holds the records of output shard ``NNNNNN``; ``_inputs/plan.json`` (written
last) lists the partitions and the extraction funnel (what the sources dropped before any download, and why).
An incremental run (``pipeline.versions``) plans only the records whose URL no earlier version attempted
(:func:`skip_seen`, counted as ``seen_url``) and numbers its partitions after the earlier versions' shards.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Container, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.shards import arrow_array, shard_name

PLAN_DIR = "_inputs"
PARTITION_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("page_url", pa.string()),
        ("alt_raw", pa.string()),
        ("extra", pa.string()),  # JSON object of extra columns carried from URL lists
        ("retry_of", pa.string()),  # key of the first attempt, for --retry-failed partitions
    ]
)


def plan_dir(dataset_url: str) -> str:
    """Where a dataset's input plan lives."""
    return storage.join(dataset_url, PLAN_DIR)


def load_plan(dataset_url: str, storage_options: dict | None = None) -> dict | None:
    """The finished plan of a dataset, or None if there is none (or planning was interrupted)."""
    url = storage.join(plan_dir(dataset_url), "plan.json")
    if not storage.exists(url, storage_options):
        return None
    return json.loads(storage.read_bytes(url, storage_options))


def save_plan(dataset_url: str, plan: dict, storage_options: dict | None = None) -> None:
    """Write plan.json whole (the partitions it names are already complete)."""
    url = storage.join(plan_dir(dataset_url), "plan.json")
    storage.write_whole(url, json.dumps(plan, indent=1).encode(), storage_options)


def record_row(rec) -> dict:
    """A Record (or mapping) as a partition row."""
    get = rec.get if isinstance(rec, dict) else lambda k, d=None: getattr(rec, k, d)
    extra = get("extra") or ()
    extra = dict(extra) if not isinstance(extra, dict) else extra
    return {
        "url": get("url"),
        "caption": get("caption"),
        "page_url": get("page_url"),
        "alt_raw": get("alt_raw"),
        "extra": json.dumps(extra, default=str, sort_keys=True) if extra else None,
        "retry_of": get("retry_of"),
    }


def skip_seen(records: Iterable, seen: Container[str], drops: Counter, reason: str = "seen_url") -> Iterator:
    """The records whose URL is not in ``seen`` (what earlier versions attempted); the others are counted in drops."""
    for rec in records:
        url = rec.get("url") if isinstance(rec, dict) else getattr(rec, "url", None)
        if url in seen:
            drops[reason] += 1
            continue
        yield rec


def write_partitions(
    records: Iterable,
    dataset_url: str,
    shard_size: int,
    start_index: int = 0,
    storage_options: dict | None = None,
    kind: str = "initial",
) -> list[dict]:
    """Stream records into partition files of ``shard_size`` rows from ``start_index`` on; returns their entries."""
    out: list[dict] = []
    batch: list[dict] = []
    index = start_index

    def flush() -> None:
        nonlocal index, batch
        url = storage.join(plan_dir(dataset_url), f"{shard_name(index)}.parquet")
        # arrow_array writes a lone surrogate (a "\ud800" escape in a JSON list or WAT record) as U+FFFD, not an error
        columns = [arrow_array([row[f.name] for row in batch], f.type) for f in PARTITION_SCHEMA]
        table = pa.Table.from_arrays(columns, schema=PARTITION_SCHEMA)
        fs, path = storage.get_fs(url, storage_options)
        storage.make_parent(fs, path)
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        out.append({"index": index, "url": url, "records": len(batch), "kind": kind})
        index += 1
        batch = []

    for rec in records:
        batch.append(record_row(rec))
        if len(batch) >= shard_size:
            flush()
    if batch:
        flush()
    return out


def read_partition(url: str, storage_options: dict | None = None) -> list[dict]:
    """The records of one partition as dicts (``extra`` decoded)."""
    import fsspec

    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        rows = pq.read_table(f, use_threads=False).to_pylist()
    for r in rows:
        r["extra"] = json.loads(r["extra"]) if r.get("extra") else {}
    return rows


def new_plan(partitions: list[dict], extraction: Counter, sources: list[dict], inputs: dict | None = None) -> dict:
    """The plan.json document; ``inputs``: the input files' fingerprints when planned (``pipeline.input_fingerprint``),
    which a rerun compares so that a list rewritten at the same path is not resumed as the old one."""
    return {
        "partitions": partitions,
        "records": sum(p["records"] for p in partitions),
        "extraction": dict(sorted(extraction.items(), key=lambda kv: (-kv[1], kv[0]))),
        "sources": sources,
        "inputs": inputs or {},
    }


def source_records(
    source, fetcher, drops: Counter, storage_options: dict | None = None, allow_private: bool = False
) -> Iterator:
    """Records of one recipe source (a ``pipeline.recipe`` source model); drops are counted in ``drops``.

    ``fetcher`` (a BackgroundFetcher) is needed to crawl sites; demo_site sources are turned into site sources by
    the caller, which starts the server. ``storage_options`` reach the URL-list and WARC readers (an ``s3://``
    input on another endpoint, credentials). ``allow_private`` is ``--allow-private-network`` for http(s) lists
    and archives, which are read under the fetcher's address rules.
    """
    kind = source.kind
    if kind == "site":
        from pipeline.sources.crawl import CrawlConfig

        cfg = CrawlConfig(
            allowed_domains=tuple(source.allowed_domains or ()), max_pages=source.max_pages, max_depth=source.max_depth
        )
        yield from fetcher.run(_crawl_all, list(source.urls), cfg, drops)
    elif kind == "url_list":
        from pipeline.sources.url_list import iter_url_list

        for path in _expand(source.path):
            yield from iter_url_list(
                path,
                input_format=source.input_format,
                url_col=source.url_col,
                caption_col=source.caption_col,
                extra_cols=tuple(source.extra_cols),
                drops=drops,
                storage_options=storage_options,
                allow_private=allow_private,
            )
    elif kind == "warc":
        from pipeline.sources.warc import iter_warc

        for pattern in source.paths:
            for path in _expand(pattern):
                yield from iter_warc(path, drops, storage_options=storage_options, allow_private=allow_private)
    elif kind == "hf_dataset":
        from pipeline.sources.url_list import iter_hf_dataset

        yield from iter_hf_dataset(
            source.name, split=source.split, url_col=source.url_col, caption_col=source.caption_col, drops=drops
        )
    else:
        raise ValueError(f"source kind {kind!r} must be resolved by the caller")


def _expand(pattern: str) -> list[str]:
    from pipeline.shards import expand_urls

    return expand_urls(pattern)


async def _crawl_all(fetcher, seeds: list[str], cfg, drops: Counter) -> list:
    """Run a crawl to the end on the fetcher's loop and collect its records (pages are bounded by max_pages)."""
    from pipeline.sources.crawl import crawl

    return [r async for r in crawl(seeds, cfg, fetcher, drops)]
