"""curate_flow: score every shard (pass 1), decide globally, reshard the kept samples (pass 2), manifest, report."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import (
    env,  # noqa: F401  (before prefect)
    workers,
)
from flows.runners import Placement, wait_for_shards
from pipeline import shards, storage
from pipeline.curate.report import write_report
from pipeline.curate.reshard import curate_shard, read_decisions
from pipeline.curate.scorer import load_scorer
from pipeline.curate.scores import is_scored, prepare_embeddings, score_shard
from pipeline.curate.stage import (
    check_destination,
    decide_dataset,
    embeddings_url,
    finish,
    parent_manifest_url,
    source_shards,
)
from pipeline.recipe import CurateSection


def worker_scorer(model: str, pretrained: str | None, device: str):
    """The CLIP scorer of this process, loaded on first use and kept for every later shard."""
    return workers.worker_object(f"clip:{model}:{pretrained}:{device}", load_scorer, model, pretrained, device)


def score_partition(src_url: str, emb_url: str, cfg_json: str, storage_options: dict | None) -> dict:
    """Pass 1 for one shard in a worker process (or inline): score it with this process's scorer."""
    cfg = CurateSection.model_validate_json(cfg_json)
    scorer = worker_scorer(cfg.clip.model, cfg.clip.pretrained, cfg.device)
    return score_shard(src_url, emb_url, cfg, scorer, storage_options).to_dict()


@task(name="curate-score", task_run_name="score-{stem}", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def score_task(stem: str, src_url: str, emb_url: str, cfg_json: str, storage_options: dict | None, processes: int):
    """Score one source shard unless pass 1 already stored it."""
    if is_scored(emb_url, src_url, storage_options):
        return {"skipped": stem}
    return workers.run("curate", processes, score_partition, src_url, emb_url, cfg_json, storage_options)


@task(name="curate-decide", cache_policy=NO_CACHE)
def decide_task(dst: str, stems: list[str], cfg_json: str, storage_options: dict | None):
    """Global thresholds and dedup over every stored score; returns (table, selection, output shard count)."""
    return decide_dataset(dst, stems, CurateSection.model_validate_json(cfg_json), storage_options)


@task(name="curate-shard", task_run_name="curate-{name}", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def curate_shard_task(name: str, srcs: dict, dst: str, provenance: dict, storage_options: dict | None) -> dict:
    """Write one output shard of pass 2 (skipped when already done)."""
    index = int(name)
    if shards.is_done(dst, index, storage_options):
        return shards.read_shard_stats(dst, name, storage_options)
    rows = read_decisions(dst, index, storage_options)
    return curate_shard(srcs, shards.shard_files(dst, index)["tar"], rows, provenance, storage_options).to_dict()


@flow(name="curate", log_prints=False)
def curate_flow(
    src: str,
    dst: str,
    cfg: dict,
    storage_options: dict | None = None,
    previous: str | None = None,
    recipe: dict | None = None,
    processes: int = 1,
    submit: bool = False,
) -> dict:
    """Curate the dataset ``src`` into ``dst`` with the CurateSection ``cfg``; returns the new manifest.

    ``submit`` hands every scoring task to the task runner (Dask, process pools) even with one process per task.
    """
    log = get_run_logger()
    ccfg = CurateSection.model_validate(cfg)
    cfg_json = ccfg.model_dump_json()
    srcs = source_shards(src, storage_options)
    check_destination(src, dst, srcs, storage_options, previous)
    emb = embeddings_url(dst)
    scorer = worker_scorer(ccfg.clip.model, ccfg.clip.pretrained, ccfg.device)  # reused by inline score tasks
    model_record = prepare_embeddings(emb, scorer, ccfg, storage_options)

    # Pass 1: one task per source shard. Inline (processes=1) the tasks run one after another: the model already
    # uses every core, and a second thread would only contend for them.
    if processes <= 1 and not submit:
        for stem, url in srcs.items():
            score_task(stem, url, emb, cfg_json, storage_options, processes)
    else:
        futures = {s: score_task.submit(s, u, emb, cfg_json, storage_options, processes) for s, u in srcs.items()}
        wait_for_shards(futures, "curate (scoring)", "source shard(s)")

    # Between the passes: global percentile, dedup across shards, output shard plan.
    table, sel, n_out = decide_task(dst, list(srcs), cfg_json, storage_options)

    # Pass 2: one task per output shard.
    shards.clean_temporaries(dst, storage_options)
    provenance = scorer.provenance()
    names = [shards.shard_name(j) for j in range(n_out)]
    wait_for_shards({n: curate_shard_task.submit(n, srcs, dst, provenance, storage_options) for n in names}, "curate")
    shards.clean_temporaries(dst, storage_options)  # what writers killed mid-shard left (never visible)

    manifest = finish(dst, ccfg, sel, model_record, parent_manifest_url(src, storage_options), recipe, storage_options)
    report = write_report(dst, srcs, table, sel, manifest, storage_options, previous) if ccfg.report else None
    publish_artifacts(manifest, dst, report)
    log.info("curate: kept %d of %d samples (cut %.4f) in %d shards", manifest["stats"]["kept"],
             manifest["stats"]["seen"], sel.threshold, n_out)  # fmt: skip
    return manifest


def funnel_rows(manifest: dict) -> list[dict]:
    """The curation funnel as table rows: each filter alone and in order, with the overlap."""
    seen = manifest["stats"]["seen"]
    rows = [{"filter": "input samples", "alone": "", "dropped": "", "share": "", "remaining": seen}]
    for f in manifest["funnel"]:
        share = f"{100 * f['dropped'] / seen:.1f}%" if seen else "0.0%"
        rows.append({"filter": f["reason"], "alone": f["alone"], "dropped": f["dropped"], "share": share,
                     "remaining": f["remaining"]})  # fmt: skip
    return rows


def publish_artifacts(manifest: dict, dst: str, report: str | None) -> None:
    """A table artifact with the funnel and a markdown artifact with the cut, the model and the report's path."""
    create_table_artifact(funnel_rows(manifest), key="curate-funnel", description=f"curation funnel for {dst}")
    cut = "none" if manifest["clip_threshold"] is None else f"{manifest['clip_threshold']:.4f}"
    where = f"[review/index.html]({report})" if report and not storage.is_local(report) else f"`{report}`"
    create_markdown_artifact(
        f"**curate** kept {manifest['stats']['kept']} of {manifest['stats']['seen']} samples in "
        f"{len(manifest['shards'])} shards at `{dst}`\n\n"
        f"CLIP cut {cut} ({json.dumps(manifest['threshold_rule'])}), model "
        f"`{manifest['clip']['clip_model']}`\n\nReview report: {where if report else 'not written'}\n\n"
        f"Filter order: {' → '.join(manifest['filter_order'])}",
        key="curate-summary",
    )


def curate_config(
    clip: str,
    pretrained: str | None = None,
    min_score: float | None = None,
    keep_fraction: float | None = None,
    report: bool | None = None,
    base: CurateSection | None = None,
) -> CurateSection:
    """A CurateSection from CLI options, on top of a recipe's section when given (validated: one threshold)."""
    data = base.model_dump() if base is not None else {"clip": {"model": clip}}
    data["clip"] = {"model": clip, "pretrained": pretrained}
    if min_score is not None or keep_fraction is not None:
        data["min_score"], data["keep_fraction"] = min_score, keep_fraction
    if report is not None:
        data["report"] = report
    return CurateSection.model_validate(data)


def run_curate(
    src: str,
    dst: str,
    clip: str,
    pretrained: str | None = None,
    min_score: float | None = None,
    keep_fraction: float | None = None,
    report: bool | None = None,
    previous: str | None = None,
    cfg: CurateSection | None = None,
    storage_options: dict | None = None,
    recipe: dict | None = None,
    processes: int = 1,
    placement: Placement | None = None,
) -> dict:
    """Run curate_flow (what ``altforge curate`` calls); returns the curated dataset's manifest."""
    ccfg = curate_config(clip, pretrained, min_score, keep_fraction, report, cfg)
    placement = placement or Placement(max_workers=max(2, processes))
    runner = placement.task_runner(processes)
    return curate_flow.with_options(task_runner=runner)(
        src,
        dst,
        ccfg.model_dump(mode="json"),
        storage_options,
        previous,
        recipe,
        placement.worker_processes(processes),
        submit=placement.kind != "local",
    )
