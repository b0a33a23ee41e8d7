"""scrape_flow: plan the inputs once, scrape one shard per task, then write the manifest and the funnel artifact."""

from __future__ import annotations

import itertools
import json
from collections import Counter

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import workers  # importing the flows package turns telemetry off before prefect loads (flows/env.py)
from flows.scrape_worker import scrape_partition
from pipeline import plan as plans
from pipeline import shards
from pipeline.fetch_thread import BackgroundFetcher
from pipeline.manifest import build_manifest, write_manifest
from pipeline.recipe import ScrapeConfig, parse_source
from pipeline.scrape import failed_records
from pipeline.stats import StageStats


@task(name="plan-scrape-inputs", cache_policy=NO_CACHE)
def plan_inputs(
    dst: str, sources: list[dict], cfg_json: str, storage_options: dict | None, retry_failed: bool
) -> dict:
    """Read the sources into fixed partitions once (a rerun reuses them); add retry partitions on request."""
    log = get_run_logger()
    cfg = ScrapeConfig.model_validate_json(cfg_json)
    plan = plans.load_plan(dst, storage_options)
    if plan is None:
        drops: Counter = Counter()
        with BackgroundFetcher(cfg.fetch_config()) as fetcher:
            records = itertools.chain.from_iterable(
                plans.source_records(parse_source(s), fetcher, drops) for s in sources
            )
            parts = plans.write_partitions(records, dst, cfg.shard_size, 0, storage_options)
        plan = plans.new_plan(parts, drops, sources)
        plans.save_plan(dst, plan, storage_options)
        log.info("planned %d records in %d partitions; extraction drops: %s", plan["records"], len(parts), dict(drops))
    if retry_failed:
        retry = failed_records(dst, storage_options)
        n = plan.get("retries", 0) + 1
        start = max((p["index"] for p in plan["partitions"]), default=-1) + 1
        parts = plans.write_partitions(retry, dst, cfg.shard_size, start, storage_options, kind=f"retry-{n}")
        plan["partitions"] += parts
        plan["retries"] = n
        plans.save_plan(dst, plan, storage_options)
        log.info("retry %d: %d transient failures into %d new shards", n, len(retry), len(parts))
    return plan


@task(
    name="scrape-shard",
    task_run_name="scrape-{name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    cache_policy=NO_CACHE,
)
def scrape_shard_task(
    name: str, partition_url: str, dst: str, cfg_json: str, storage_options: dict | None, processes: int
) -> dict:
    """Scrape one shard (skipped when already done), in the run's worker pool."""
    if shards.is_done(dst, int(name), storage_options):
        return shards.read_shard_stats(dst, name, storage_options)
    dst_url = shards.shard_files(dst, int(name))["tar"]
    return workers.run("scrape", processes, scrape_partition, partition_url, dst_url, cfg_json, storage_options)


@flow(name="scrape", log_prints=False)
def scrape_flow(
    dst: str,
    sources: list[dict],
    cfg: dict,
    storage_options: dict | None = None,
    retry_failed: bool = False,
    recipe: dict | None = None,
    parent: str | None = None,
) -> dict:
    """Scrape ``sources`` into the dataset ``dst``; returns its manifest."""
    log = get_run_logger()
    scfg = ScrapeConfig.model_validate(cfg)
    cfg_json = scfg.model_dump_json()
    plan = plan_inputs(dst, sources, cfg_json, storage_options, retry_failed)
    shards.clean_temporaries(dst, storage_options)
    futures = [
        scrape_shard_task.submit(
            shards.shard_name(p["index"]), p["url"], dst, cfg_json, storage_options, scfg.processes
        )
        for p in plan["partitions"]
    ]
    failed = []
    for p, fut in zip(plan["partitions"], futures, strict=True):
        fut.wait()
        if not fut.state.is_completed():
            failed.append(f"{shards.shard_name(p['index'])} ({fut.state.message or fut.state.name})")
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed; rerun to resume: {', '.join(failed[:5])}")
    manifest = build_manifest(
        dst,
        "scrape",
        scfg.model_dump(),
        recipe=recipe,
        parent=parent,
        storage_options=storage_options,
        extra={"input_records": plan["records"], "extraction": plan["extraction"], "sources": sources},
    )
    write_manifest(dst, manifest, storage_options)
    publish_funnel("scrape", manifest, dst)
    log.info(
        "scrape: %d of %d records kept in %d shards",
        manifest["stats"]["kept"],
        plan["records"],
        len(plan["partitions"]),
    )
    return manifest


def funnel_rows(manifest: dict) -> list[dict]:
    """The funnel as table rows: extraction drops, then download/image drops, then what was written."""
    stats = StageStats.from_dict(manifest["stats"])
    extraction = manifest.get("extraction") or {}
    rows = [{"step": "candidates on pages/lists", "count": stats.seen + sum(extraction.values()), "reason": ""}]
    rows += [{"step": "dropped before download", "count": -n, "reason": r} for r, n in extraction.items()]
    rows.append({"step": "records attempted", "count": stats.seen, "reason": ""})
    rows += [{"step": "dropped", "count": -n, "reason": r} for r, n in manifest["stats"]["dropped"].items()]
    rows.append({"step": "images written", "count": stats.kept, "reason": ""})
    return rows


def publish_funnel(stage: str, manifest: dict, dst: str) -> None:
    """A table artifact with the funnel and a markdown artifact with where the data is."""
    create_table_artifact(funnel_rows(manifest), key=f"{stage}-funnel", description=f"{stage} funnel for {dst}")
    create_markdown_artifact(
        f"**{stage}** wrote {manifest['samples']} samples in {len(manifest['shards'])} shards to `{dst}`\n\n"
        f"```json\n{json.dumps(manifest['stats'], indent=1)}\n```",
        key=f"{stage}-summary",
    )


def run_scrape(
    dst: str,
    sources: list[dict],
    cfg: ScrapeConfig,
    storage_options: dict | None = None,
    retry_failed: bool = False,
    recipe: dict | None = None,
) -> dict:
    """Run scrape_flow with a task runner sized to the configured processes."""
    runner = ThreadPoolTaskRunner(max_workers=max(1, cfg.processes))
    return scrape_flow.with_options(task_runner=runner)(
        dst, sources, cfg.model_dump(), storage_options, retry_failed, recipe
    )
