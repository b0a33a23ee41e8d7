"""What a scrape worker process runs. No prefect here: worker processes stay light and start no Prefect server."""

from __future__ import annotations

from flows import workers
from pipeline import plan as plans
from pipeline.fetch_thread import BackgroundFetcher
from pipeline.recipe import ScrapeConfig
from pipeline.scrape import scrape_shard


def scrape_partition(partition_url: str, dst_url: str, cfg_json: str, storage_options: dict | None) -> dict:
    """Scrape one partition into one shard; runs in a worker process, which keeps its fetcher between shards."""
    cfg = ScrapeConfig.model_validate_json(cfg_json)
    fetch_cfg = cfg.fetch_config()
    fetcher = workers.worker_object(f"fetcher:{fetch_cfg!r}", BackgroundFetcher, fetch_cfg)
    records = plans.read_partition(partition_url, storage_options)
    stats = scrape_shard(records, dst_url, cfg, fetcher, storage_options, progress=workers.worker_progress())
    return stats.to_dict()
