"""The curation stage end to end, in the order a flow runs it: score, decide globally, reshard, manifest, report.

``curate_dataset`` runs every step in this process (tests, benchmarks, notebooks); ``flows/curate.py`` maps the
same shard functions over Prefect tasks.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re

import numpy as np

from pipeline import manifest as manifests
from pipeline import shards, storage, versions
from pipeline.curate.reshard import curate_shard, plan_spans, read_decisions, write_decisions
from pipeline.curate.scorer import ClipScorer
from pipeline.curate.scores import is_scored, prepare_embeddings, read_scores, score_shard, shard_stem
from pipeline.curate.select import Selection, select
from pipeline.stats import StageStats

EMBEDDINGS = "embeddings"


def embeddings_url(dst_url: str) -> str:
    """Where pass 1 writes embeddings and score tables (clip-retrieval layout)."""
    return storage.join(dst_url, EMBEDDINGS)


def source_shards(src: str, storage_options: dict | None = None) -> dict[str, str]:
    """Stem -> tar URL of the input dataset (a directory, manifest.json or brace pattern), in order."""
    urls = shards.shard_urls(src, storage_options)
    if not urls:
        raise ValueError(f"{src}: no shards to curate")
    out = {shard_stem(u): u for u in urls}
    if len(out) != len(urls):
        raise ValueError(f"{src}: two input shards share a file name")
    return out


def _place(url: str) -> str:
    """A comparable form of a dataset location (local paths resolved)."""
    if storage.is_local(url):
        return os.path.realpath(url.removeprefix("file://"))
    return url.rstrip("/")


def check_destination(
    src: str, dst_url: str, srcs: dict[str, str], storage_options: dict | None = None, previous: str | None = None
) -> None:
    """ValueError (one line) for an output that would destroy data: the input, or a dataset curate did not write.

    A rerun into its own earlier output is fine (stale shards are replaced); anything else holding shards is not,
    because pass 2 removes the output shards that the new decisions do not produce.
    """
    dst = _place(dst_url)
    if dst in {_place(posixpath.dirname(u)) for u in srcs.values()} or dst == _place(src):
        raise ValueError(f"--out {dst_url} is the input dataset; curation writes a new one: give another --out")
    done = shards.done_shards(dst_url, storage_options)
    ours = storage.exists(storage.join(dst_url, "decisions.sha256"), storage_options) or storage.exists(
        storage.join(embeddings_url(dst_url), "model.json"), storage_options
    )
    if done and not ours:
        raise ValueError(f"{dst_url} holds {len(done)} shard(s) that curation did not write; give a new --out")
    if previous and _place(previous.removesuffix("manifest.json")) == dst:
        raise ValueError(
            f"--previous {previous} is the output itself, which this run rewrites; copy it first or curate into a "
            "new --out to compare"
        )


parent_manifest_url = versions.input_manifest_url  # the input's manifest, recorded as the output's parent


def decide_dataset(dst_url: str, stems: list[str], cfg, storage_options: dict | None = None, detect_language=None):
    """Read every shard's scores, decide every sample, assign output shards; writes and returns the decisions."""
    table, img_emb = read_scores(embeddings_url(dst_url), stems, storage_options)
    check_unique_keys(table)
    sel = select(table, img_emb, cfg, detect_language)
    table["status"] = sel.status
    table["duplicate_of"] = sel.duplicate_of
    table["detail"] = sel.detail
    out_shard = np.zeros(len(table), np.int32)
    spans = plan_spans(sel.kept, cfg.shard_size)
    for j, (a, b) in enumerate(spans):
        out_shard[a:b] = j
    table["out_shard"] = out_shard
    model = storage.join(embeddings_url(dst_url), "model.json")
    provenance = storage.read_bytes(model, storage_options) if storage.exists(model, storage_options) else b""
    if _drop_stale_output(dst_url, table, provenance, storage_options) or not all(
        shards.is_done(dst_url, j, storage_options) for j in range(len(spans))
    ):
        unpublish(dst_url, storage_options)
    write_decisions(dst_url, table, storage_options)
    return table, sel, len(spans)


def unpublish(dst_url: str, storage_options: dict | None = None) -> None:
    """Remove the manifest and the review report before any shard changes: a run that fails then leaves none."""
    storage.remove(storage.join(dst_url, "manifest.json"), storage_options)
    fs, path = storage.get_fs(storage.join(dst_url, "review"), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_unique_keys(table) -> None:
    """ValueError (one line) naming a sample key that two input samples share, and the shards that hold them."""
    twice = table["key"].duplicated(keep=False)
    if twice.any():
        key = table.loc[twice, "key"].iloc[0]
        a, b = table.loc[table["key"] == key, "shard"].iloc[:2]
        where = f"twice in source shard {a}.tar" if a == b else f"in source shards {a}.tar and {b}.tar"
        raise ValueError(f"sample key {key!r} is {where}: keys must be unique, rename or drop one")


def _drop_stale_output(dst_url: str, table, provenance: bytes, storage_options: dict | None = None) -> bool:
    """Remove output shards written from other decisions (a rerun with another threshold, detail or model).

    Every column of the decisions (scores, details, errors, metadata) and the model record decide; returns whether
    shards were (or may have been) removed, after removing the manifest that lists them.
    """
    h = hashlib.sha256(table.to_csv(index=False).encode())
    h.update(provenance)
    digest = h.hexdigest()
    url = storage.join(dst_url, "decisions.sha256")
    old = storage.read_bytes(url, storage_options).decode() if storage.exists(url, storage_options) else None
    if old == digest:
        return False
    unpublish(dst_url, storage_options)
    for name in output_shard_names(dst_url, storage_options):
        for f in shards.shard_files(dst_url, int(name)).values():
            storage.remove(f, storage_options)
    storage.write_bytes(url, digest.encode(), storage_options)
    return True


OUTPUT_FILE = re.compile(r"^(\d{6})(\.tar|\.parquet|_stats\.json)$")


def output_shard_names(dst_url: str, storage_options: dict | None = None) -> list[str]:
    """Names of every output shard with any of its files: done ones, and those a kill left half published (a tar
    and parquet renamed into place, its stats not yet), which globs and dataset loaders would still read."""
    found = (OUTPUT_FILE.match(n) for n in storage.listdir(dst_url, storage_options))
    return sorted({m.group(1) for m in found if m})


def selection_record(sel: Selection) -> dict:
    """The part of the manifest that says how samples were chosen (order, cut, funnel with overlaps)."""
    return {
        "filter_order": sel.order,
        "clip_threshold": sel.threshold if math.isfinite(sel.threshold) else None,  # None: nothing reached the cut
        "threshold_rule": sel.rule,
        "funnel": sel.funnel,
        "overlap": sel.overlap,
        "duplicate_clusters": len(sel.clusters),
    }


def finish(
    dst_url: str,
    cfg,
    sel: Selection,
    model_record: dict,
    parent: str | None,
    recipe: dict | None = None,
    storage_options: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Build and write the curated dataset's manifest; returns it."""
    manifest = manifests.build_manifest(
        dst_url,
        "curate",
        cfg.model_dump(),
        recipe=recipe,
        parent=parent,
        storage_options=storage_options,
        extra={
            "clip": model_record,
            "embeddings": embeddings_url(dst_url),
            **selection_record(sel),
            **(extra or {}),
        },
    )
    StageStats.from_dict(manifest["stats"]).check()
    manifests.write_manifest(dst_url, manifest, storage_options)
    return manifest


def curate_dataset(
    src: str,
    dst_url: str,
    cfg,
    scorer: ClipScorer,
    storage_options: dict | None = None,
    previous: str | None = None,
    recipe: dict | None = None,
    detect_language=None,
) -> dict:
    """Curate the dataset ``src`` into ``dst_url`` in this process (CurateSection ``cfg``); returns the manifest."""
    srcs = source_shards(src, storage_options)
    check_destination(src, dst_url, srcs, storage_options, previous)
    emb = embeddings_url(dst_url)
    model_record = prepare_embeddings(emb, scorer, cfg, storage_options)
    score_stats = StageStats()
    for url in srcs.values():
        if not is_scored(emb, url, storage_options):
            score_stats += score_shard(url, emb, cfg, scorer, storage_options)
    table, sel, n_out = decide_dataset(dst_url, list(srcs), cfg, storage_options, detect_language)
    shards.clean_temporaries(dst_url, storage_options)
    for j in range(n_out):
        if not shards.is_done(dst_url, j, storage_options):
            rows = read_decisions(dst_url, j, storage_options)
            curate_shard(srcs, shards.shard_files(dst_url, j)["tar"], rows, scorer.provenance(), storage_options)
    manifest = finish(
        dst_url,
        cfg,
        sel,
        model_record,
        parent_manifest_url(src, storage_options),
        recipe,
        storage_options,
        extra={"score_timings": dict(score_stats.timings)},
    )
    if cfg.report:
        from pipeline.curate.report import write_report

        write_report(dst_url, srcs, table, sel, manifest, storage_options, previous=previous)
    return manifest
