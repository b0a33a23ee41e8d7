"""The scrape stage: one input partition of image records in, one WebDataset shard out.

Downloads run on a :class:`~pipeline.fetch_thread.BackgroundFetcher` (async, many connections); decoding, resizing
and encoding run in the calling thread as results arrive, so a process keeps both the network and a core busy.
Every input record ends as exactly one parquet row: ``success`` or the reason it was dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from pipeline.fetch import FetchResult
from pipeline.images import ImageConfig, ImageRejected, process_image
from pipeline.recipe import ScrapeConfig
from pipeline.shards import ShardWriter, shard_name
from pipeline.stats import StageStats

# Failures worth another try later (``--retry-failed``): the server or the network, not the content.
TRANSIENT_STATUSES = frozenset(
    {"timeout", "stalled", "connection_error", "dns_error", "http_408", "http_429", "robots_unavailable"}
)
POLICY_SETTINGS = ("respect_robots", "respect_opt_out")  # with the image settings: what decides a dataset's samples
PROGRESS_EVERY = 0.5  # seconds between progress callbacks


def is_transient(status: str) -> bool:
    """Whether a failed record may succeed on a later attempt (network faults, 429 and 5xx)."""
    return status in TRANSIENT_STATUSES or (status.startswith("http_5") and len(status) == 8)


def sample_key(shard_index: int, position: int) -> str:
    """Stable, dataset-unique key: the input partition's index and the record's position in it."""
    return f"{shard_name(shard_index)}{position:06d}"


def split_shard_url(dst_url: str) -> tuple[str, int]:
    """``.../out/000012.tar`` -> (``.../out``, 12)."""
    base, _, name = dst_url.rstrip("/").rpartition("/")
    stem = name.removesuffix(".tar")
    if not (stem.isdigit() and len(stem) == 6 and name.endswith(".tar")):
        raise ValueError(f"not a shard URL (expected .../NNNNNN.tar): {dst_url}")
    return base or ".", int(stem)


def scrape_shard(
    records: Sequence[Mapping],
    dst_url: str,
    cfg: ScrapeConfig,
    fetcher,
    storage_options: dict | None = None,
    progress: Callable[[dict], None] | None = None,
) -> StageStats:
    """Download, check, resize and encode the images of ``records`` into the shard ``dst_url``.

    ``records`` are mappings with ``url``, ``caption`` and optionally ``page_url``, ``alt_raw``, ``extra`` (dict)
    and ``retry_of`` (key of an earlier failed attempt). ``fetcher`` is a BackgroundFetcher (anything with
    ``submit(url) -> Future[FetchResult]``). ``progress`` receives count deltas every half second.
    """
    dataset_url, index = split_shard_url(dst_url)
    icfg = cfg.image_config()
    stats = StageStats(seen=len(records))
    window = max(8, cfg.concurrency * 2)  # downloads in flight from this shard
    reported = Counter()
    last_report = time.monotonic()

    with ShardWriter(dataset_url, index, storage_options) as writer:
        pending: dict[cf.Future, int] = {}
        todo = iter(range(len(records)))

        def refill() -> None:
            for i in todo:
                pending[fetcher.submit(str(records[i].get("url") or ""))] = i
                if len(pending) >= window:
                    return

        refill()
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # a fetch bug costs its record, not the shard (whose retries would fail too)
                    url = str(records[i].get("url") or "")
                    result = FetchResult(url, url, "fetch_error", error=f"{type(e).__name__}: {e}"[:500])
                with stats.timer("process"):
                    sample, row = build_sample(records[i], sample_key(index, i), result, icfg)
                writer.add_row(row)
                if sample is None:
                    stats.drop(row["status"])
                else:
                    writer.write(sample)
                    stats.kept += 1
            refill()
            if progress is not None and time.monotonic() - last_report > PROGRESS_EVERY:
                last_report = time.monotonic()
                reported = _report(progress, stats, reported)
        with stats.timer("publish"):
            writer.publish(stats)
    if progress is not None:
        _report(progress, stats, reported)
    stats.check()
    return stats


def _report(progress: Callable[[dict], None], stats: StageStats, reported: Counter) -> Counter:
    now = Counter({"seen": stats.kept + stats.n_dropped, "kept": stats.kept, **stats.dropped})
    delta = {k: v - reported.get(k, 0) for k, v in now.items() if v != reported.get(k, 0)}
    if delta:
        progress(delta)
    return now


def build_sample(record: Mapping, key: str, result, icfg: ImageConfig) -> tuple[dict | None, dict]:
    """Turn one fetch result into (sample or None, parquet row); the row's status says why it was dropped."""
    caption = record.get("caption")
    row = {
        "key": key,
        "url": record.get("url"),
        "page_url": record.get("page_url"),
        "caption": caption,
        "status": result.status,
        "error": result.error,
        "http_status": result.http_status,
        "content_type": result.content_type,
        "attempts": result.attempts,
        "fetch_seconds": round(result.elapsed, 4),
    }
    if record.get("retry_of"):
        row["retry_of"] = record["retry_of"]
    if not result.ok:
        return None, row
    try:
        img = process_image(result.body, icfg)
    except ImageRejected as e:
        row.update(status=e.reason, error=e.message)
        return None, row
    row.update(
        width=img.width,
        height=img.height,
        original_width=img.original_width,
        original_height=img.original_height,
        sha256=img.sha256,
        phash=img.phash,
        original_format=img.original_format,
    )
    meta = {
        **dict(record.get("extra") or {}),  # a URL list's other columns, first: they never replace the fields below
        "key": key,
        "url": record.get("url"),
        "final_url": result.final_url,
        "page_url": record.get("page_url"),
        "caption": caption,
        "alt_raw": record.get("alt_raw"),
        "width": img.width,
        "height": img.height,
        "original_width": img.original_width,
        "original_height": img.original_height,
        "original_format": img.original_format,
        "sha256": img.sha256,
        "phash": img.phash,
    }
    if record.get("retry_of"):
        meta["retry_of"] = record["retry_of"]
    return {"__key__": key, img.ext: img.data, "txt": caption or "", "json": meta}, row


def failed_records(
    dataset_url: str, storage_options: dict | None = None, partitions: Mapping[int, str] | None = None
) -> list[dict]:
    """Records whose newest attempt in a scraped dataset failed transiently (``--retry-failed`` input).

    Reads every finished shard (not the manifest, which a run killed before its end has not rewritten). A retried
    record carries ``retry_of``: the key of its first attempt, so chains of retries group together. ``partitions``
    (a plan's partition index -> URL) give each record back as it was planned: its raw alt text and a URL list's
    other columns, which the shard's parquet does not hold.
    """
    import fsspec
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline import plan as plans
    from pipeline import shards

    frames = []
    for name in shards.done_shards(dataset_url, storage_options):
        with fsspec.open(shards.shard_files(dataset_url, int(name))["parquet"], "rb", **(storage_options or {})) as f:
            frames.append(pq.read_table(f, use_threads=False).to_pandas())
    if not frames:
        return []
    df = pd.concat(frames, ignore_index=True)
    df = df.astype(object).where(df.notna(), None)
    root = df["retry_of"].fillna(df["key"]) if "retry_of" in df else df["key"]
    latest = df.assign(root=root).sort_values("key").groupby("root", sort=True).tail(1)
    latest = latest[latest["status"].map(lambda s: is_transient(str(s)))]
    planned: dict[int, list[dict]] = {}
    out = []
    for r in latest.sort_values("root").itertuples(index=False):
        rec = {"url": r.url, "caption": r.caption, "page_url": r.page_url}
        index, position = int(r.root[:6]), int(r.root[6:])
        if partitions and index in partitions:
            if index not in planned:
                planned[index] = plans.read_partition(partitions[index], storage_options)
            rows = planned[index]
            if position < len(rows) and rows[position].get("url") == r.url:
                rec = {k: rows[position].get(k) for k in ("url", "caption", "page_url", "alt_raw", "extra")}
        out.append({**rec, "retry_of": r.root})
    return out


def plan_settings(cfg: ScrapeConfig) -> dict:
    """The settings every shard of one dataset must share: image processing and the robots/opt-out policy."""
    d = dataclasses.asdict(cfg.image_config())
    d.update({k: getattr(cfg, k) for k in POLICY_SETTINGS})
    return json.loads(json.dumps(d))


def check_version_settings(parent_manifest: dict, cfg: ScrapeConfig, root: str) -> None:
    """A one-line ``ValueError`` when the next version of the incremental root ``root`` would be scraped with other
    sample settings than the version before it (``parent_manifest``): the root reads as one dataset, so its
    versions must share image size, format and policy, as the shards of one version do."""
    try:
        saved = plan_settings(ScrapeConfig.model_validate(parent_manifest.get("config") or {}))
    except ValueError:  # a manifest too old or foreign to say: nothing to compare
        return
    now = plan_settings(cfg)
    if saved != now:
        changed = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if saved.get(k) != now[k])
        raise ValueError(
            f"{root}: its versions were scraped with other settings ({changed}): use them again, or a new root"
        )


def check_resume(
    plan: dict | None,
    sources: list[dict],
    cfg: ScrapeConfig,
    dst: str,
    retry_failed: bool,
    storage_options: dict | None = None,
    check_contents: bool = True,
) -> None:
    """A one-line ``ValueError`` when a scrape into ``dst`` cannot go on from its ``plan`` (None: not planned yet):
    other inputs, other contents of an input file, or other sample settings than the finished shards had, or
    ``--retry-failed`` with nothing to retry.

    ``check_contents``: read the input files again and compare them with the plan's record (False: an incremental
    run finishing its version as planned).
    """
    if plan is None:
        if retry_failed and not sources:
            raise ValueError(f"--retry-failed: {dst} holds no earlier scrape to retry (no plan there)")
        return
    if sources and plan.get("sources") != json.loads(json.dumps(sources)):
        kinds = ", ".join(sorted({str(s.get("kind")) for s in plan.get("sources") or []})) or "none"
        raise ValueError(
            f"{dst} was planned from other inputs ({kinds}): rerun with the same inputs to resume, or use another "
            "--out"
        )
    if check_contents:
        check_inputs(plan, sources, dst, storage_options, cfg.allow_private_network)
    saved, now = plan.get("settings"), plan_settings(cfg)
    if saved is not None and saved != now:
        changed = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if saved.get(k) != now[k])
        raise ValueError(f"{dst} was scraped with other settings ({changed}): use another --out, or the old ones")


def check_inputs(plan: dict, sources: list[dict], dst: str, storage_options: dict | None, allow_private: bool) -> None:
    """A one-line ``ValueError`` when an input file of ``plan`` holds other contents now than it was planned from."""
    from pipeline import input_fingerprint

    if (changed := input_fingerprint.changed_since(plan, sources, storage_options, allow_private)) is not None:
        raise ValueError(input_fingerprint.changed_message(dst, changed))
