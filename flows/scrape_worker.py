"""What a scrape worker process runs. No prefect here: worker processes stay light and start no Prefect server."""

from __future__ import annotations

import hashlib

from flows import workers
from pipeline import plan as plans
from pipeline import storage, versions
from pipeline.fetch_thread import BackgroundFetcher
from pipeline.recipe import ScrapeConfig
from pipeline.scrape import scrape_shard


def scrape_partition(
    partition_url: str,
    dst_url: str,
    cfg_json: str,
    storage_options: dict | None,
    seen_from: str | None = None,
    host_share: int | None = None,
) -> dict:
    """Scrape one partition into one shard; runs in a worker process, which keeps its fetcher between shards.

    ``seen_from`` (incremental runs: the previous version's manifest URL) turns downloads of bytes that version or
    its ancestors stored into ``seen_content`` drops. ``host_share``: how many processes share the per-host limits
    (default ``processes``; on Dask, the cluster's worker processes).
    """
    cfg = ScrapeConfig.model_validate_json(cfg_json)
    fetch_cfg = cfg.fetch_config().for_processes(host_share or cfg.processes)  # the per-host limits are shared
    fetcher = workers.worker_object(f"fetcher:{fetch_cfg!r}", BackgroundFetcher, fetch_cfg)
    if seen_from:
        fetcher = versions.SeenContentFetcher(fetcher, stored_content(seen_from, storage_options))
    records = plans.read_partition(partition_url, storage_options)
    stats = scrape_shard(records, dst_url, cfg, fetcher, storage_options, progress=workers.worker_progress("scrape"))
    return stats.to_dict()


def stored_content(seen_from: str, storage_options: dict | None) -> versions.StoredContent:
    """The stored content hashes of ``seen_from`` and its ancestors, read once per process (only the latest kept).

    Cached under the manifest's own hash, so a dataset rebuilt at the same URL is never judged by stale hashes.
    """
    cache = workers.worker_object("stored-content", dict)
    tag = (seen_from, hashlib.sha256(storage.read_bytes(seen_from, storage_options)).hexdigest())
    if tag not in cache:
        cache.clear()
        cache[tag] = versions.stored_content(seen_from, storage_options)
    return cache[tag]
