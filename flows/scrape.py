"""scrape_flow: plan the inputs once, scrape one shard per task, then write the manifest and the funnel artifact."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import Counter

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import workers  # importing the flows package turns telemetry off before prefect loads (flows/env.py)
from flows.runners import Placement, dask_worker_count, wait_for_shards
from flows.scrape_worker import scrape_partition
from pipeline import input_fingerprint, shards, storage, versions
from pipeline import plan as plans
from pipeline.fetch_thread import BackgroundFetcher
from pipeline.manifest import build_manifest, write_manifest
from pipeline.recipe import ScrapeConfig, parse_source
from pipeline.scrape import check_resume, check_version_settings, failed_records, plan_settings
from pipeline.stats import StageStats


@task(name="plan-scrape-inputs", cache_policy=NO_CACHE)
def plan_inputs(
    dst: str,
    sources: list[dict],
    cfg_json: str,
    storage_options: dict | None,
    retry_failed: bool,
    seen_from: str | None = None,
    start_index: int = 0,
    incremental: bool = False,
) -> dict:
    """Read the sources into fixed partitions once (a rerun reuses them); add retry partitions on request.

    Incremental runs pass ``seen_from`` (the previous version's manifest): records whose URL it or its ancestors
    attempted are skipped (``seen_url``), and partitions are numbered from ``start_index``.
    """
    log = get_run_logger()
    cfg = ScrapeConfig.model_validate_json(cfg_json)
    plan = plans.load_plan(dst, storage_options)
    # an unfinished version of an incremental run is finished as planned (the next run plans the new contents)
    check_resume(plan, sources, cfg, dst, retry_failed, storage_options, check_contents=not incremental)
    if incremental and plan is not None:
        _note_changed_inputs(plan, sources, dst, storage_options, cfg, log)
    if plan is None:
        # fingerprinted before reading: a list rewritten meanwhile reads as changed on the next run, never as current
        inputs = input_fingerprint.fingerprint_inputs(sources, storage_options, cfg.allow_private_network)
        drops: Counter = Counter()
        seen = versions.seen_urls(seen_from, storage_options) if seen_from else None
        with BackgroundFetcher(cfg.fetch_config()) as fetcher:
            records = itertools.chain.from_iterable(
                plans.source_records(parse_source(s), fetcher, drops, storage_options, cfg.allow_private_network)
                for s in sources
            )
            if seen is not None:
                log.info("incremental: %d URLs already attempted by %s", len(seen), seen_from)
                records = plans.skip_seen(records, seen, drops, versions.SEEN_URL)
            parts = plans.write_partitions(records, dst, cfg.shard_size, start_index, storage_options)
        plan = plans.new_plan(parts, drops, sources, inputs)
        plan["settings"] = plan_settings(cfg)  # a rerun with other image settings or policy is refused
        plans.save_plan(dst, plan, storage_options)
        log.info("planned %d records in %d partitions; extraction drops: %s", plan["records"], len(parts), dict(drops))
    unfinished_retry = retry_failed and any(
        p.get("kind", "").startswith("retry") and not shards.is_done(dst, p["index"], storage_options)
        for p in plan["partitions"]
    )
    if unfinished_retry:  # a killed retry run: finish its round, or its records would be attempted twice
        log.info("retry %d: resuming its unfinished shards instead of starting another round", plan.get("retries", 0))
    elif retry_failed:  # a new round from the newest outcome of each record in the finished shards
        inputs = {p["index"]: p["url"] for p in plan["partitions"]}
        retry = failed_records(dst, storage_options, inputs)
        n = plan.get("retries", 0) + 1
        start = max((p["index"] for p in plan["partitions"]), default=start_index - 1) + 1
        parts = plans.write_partitions(retry, dst, cfg.shard_size, start, storage_options, kind=f"retry-{n}")
        plan["partitions"] += parts
        plan["retries"] = n
        plans.save_plan(dst, plan, storage_options)
        log.info("retry %d: %d transient failures into %d new shards", n, len(retry), len(parts))
    return plan


def _note_changed_inputs(plan: dict, sources: list[dict], dst: str, so: dict | None, cfg: ScrapeConfig, log) -> None:
    """Log that an unfinished version's input changed since it was planned: it is finished with the records it
    planned, and the next incremental run plans the new contents (their URLs not seen before)."""
    if (changed := input_fingerprint.changed_since(plan, sources, so, cfg.allow_private_network)) is not None:
        log.warning(
            "%s was planned from other contents of %s: finished as planned; the next incremental run adds the new "
            "records",
            dst,
            changed,
        )


@task(
    name="scrape-shard",
    task_run_name="scrape-{name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    cache_policy=NO_CACHE,
)
def scrape_shard_task(
    name: str,
    partition_url: str,
    dst: str,
    cfg_json: str,
    storage_options: dict | None,
    processes: int,
    seen_from: str | None = None,
    host_share: int | None = None,
) -> dict:
    """Scrape one shard (skipped when already done), in the run's worker pool."""
    if shards.is_done(dst, int(name), storage_options):
        return shards.read_shard_stats(dst, name, storage_options)
    dst_url = shards.shard_files(dst, int(name))["tar"]
    return workers.run(
        "scrape", processes, scrape_partition, partition_url, dst_url, cfg_json, storage_options, seen_from, host_share
    )


@flow(name="scrape", log_prints=False)
def scrape_flow(
    dst: str,
    sources: list[dict],
    cfg: dict,
    storage_options: dict | None = None,
    retry_failed: bool = False,
    recipe: dict | None = None,
    parent: str | None = None,
    incremental: bool = False,
    processes: int | None = None,
    host_share: int | None = None,
) -> dict:
    """Scrape ``sources`` into the dataset ``dst``; returns its manifest.

    ``processes`` overrides the config's worker processes per task (1 on Dask, where each worker is a process).

    With ``incremental``, ``dst`` is a versioned dataset root (``pipeline.versions``): the run writes its next
    version, fetching only URLs no earlier version attempted and keeping no bytes an earlier version stored; the
    version's manifest names the previous one as ``parent`` (overriding the ``parent`` argument).
    """
    log = get_run_logger()
    if incremental and retry_failed:  # the next version attempts earlier transient failures again by itself
        raise ValueError("retry_failed does not combine with incremental")
    scfg = ScrapeConfig.model_validate(cfg)
    cfg_json = scfg.model_dump_json()
    # an incremental scrape holds its versioned root until its version is written
    with versions.writer_lock(dst, storage_options) if incremental else contextlib.nullcontext():
        target = versions.next_version(dst, storage_options) if incremental else None
        if target is not None:
            dst, parent = target.url, target.parent
            if parent is not None:  # the versions read as one dataset: one size, format and policy
                check_version_settings(storage.read_json_object(parent, storage_options), scfg, target.root)
            log.info("incremental: version %d at %s, parent %s", target.number, dst, parent or "none")
        seen_from, start = (target.parent, target.start_index) if target is not None else (None, 0)
        plan = plan_inputs(dst, sources, cfg_json, storage_options, retry_failed, seen_from, start, incremental)
        shards.clean_temporaries(dst, storage_options)
        nproc = processes or scfg.processes
        futures = [
            scrape_shard_task.submit(
                shards.shard_name(p["index"]), p["url"], dst, cfg_json, storage_options, nproc, seen_from, host_share
            )
            for p in plan["partitions"]
        ]
        names = [shards.shard_name(p["index"]) for p in plan["partitions"]]
        wait_for_shards(dict(zip(names, futures, strict=True)), "scrape")
        shards.clean_temporaries(dst, storage_options)  # what writers killed mid-shard left (never visible)
        manifest = build_manifest(
            dst,
            "scrape",
            scfg.model_dump(),
            recipe=recipe,
            parent=parent,
            storage_options=storage_options,
            extra={"input_records": plan["records"], "extraction": plan["extraction"], "sources": sources},
        )
        if target is not None:
            versions.stamp_manifest(manifest, target, storage_options)
        write_manifest(dst, manifest, storage_options)
        if target is not None:
            versions.write_index(target.root, storage_options)
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
    incremental: bool = False,
    placement: Placement | None = None,
) -> dict:
    """Run scrape_flow where ``placement`` says (default: threads feeding the stage's own process pool)."""
    placement = placement or Placement(max_workers=cfg.processes)
    runner = placement.task_runner(cfg.processes)
    return scrape_flow.with_options(task_runner=runner)(
        dst,
        sources,
        cfg.model_dump(),
        storage_options,
        retry_failed,
        recipe,
        incremental=incremental,
        processes=placement.worker_processes(cfg.processes),
        host_share=dask_worker_count(placement.dask_address) if placement.kind == "dask" else None,
    )
