"""What a scrape's file-backed inputs hold now: one fingerprint per URL list, WARC/WAT path or local HF folder.

A plan records them (``plan["inputs"]``) and the recipe runner folds them into the scrape's fingerprint, so a list
rewritten at the same path is not taken for the one a dataset was planned from. Crawled sites, the demo site and
hub datasets have no file to read here and are not fingerprinted (their plan compares as before).

Small files (URL lists, most WAT files) are fingerprinted by the sha256 of their bytes, so touching one without
changing it changes nothing. Files over ``HASH_LIMIT`` (Common Crawl WARCs are ~1 GB; big parquet lists) are
fingerprinted by size plus the store's cheap identity (ETag on object stores and HTTP, mtime on disk): hashing
them would read every byte on each rerun, and a rewrite changes size or stamp anyway (a mere touch of such a
file reads as a change, which is the price). An HTTP file whose size the server does not say (no HEAD, a
chunked answer) is read up to ``HASH_LIMIT`` bytes only: past that it is fingerprinted as
``partial-sha256:<hex of the first HASH_LIMIT bytes>;stamp:<ETag or Last-Modified, if any>``, which misses a rewrite
that keeps those first bytes and sends no stamp (or the same one). Reads go through the same guarded fsspec options
as the sources.
"""

from __future__ import annotations

import hashlib
import json
import os

HASH_LIMIT = 64 << 20  # bytes: files up to this size are hashed, bigger ones identified by size and stamp
READ_BYTES = 1 << 20
STAMP_KEYS = ("ETag", "etag", "mtime", "LastModified", "Last-Modified")


def input_paths(source: dict) -> list[str]:
    """The file-backed inputs of one source mapping, as the source names them (patterns unexpanded)."""
    kind = source.get("kind")
    if kind == "url_list":
        return [source["path"]]
    if kind == "warc":
        return list(source["paths"])
    if kind == "hf_dataset" and os.path.isdir(str(source.get("name"))):  # a hub id is not a file here
        return [source["name"]]
    return []


def fingerprint_inputs(
    sources: list[dict], storage_options: dict | None = None, allow_private: bool = False
) -> dict[str, str]:
    """``{input path: fingerprint}`` of the sources' file-backed inputs as they are now.

    An input that cannot be read now (gone, refused, no format, a server answering 5xx, an endpoint down) is left
    out, as unknown: the scrape itself says what is wrong with it.
    """
    out: dict[str, str] = {}
    for source in sources:
        for path in input_paths(source):
            try:
                out[path] = _path_fingerprint(source, path, storage_options, allow_private)
            except Exception as e:
                if not _unreadable(e):
                    raise
    return out


def _unreadable(e: BaseException) -> bool:
    """Whether ``e`` says an input cannot be read now (rather than a bug): gone, refused, or its storage unreachable
    (aiohttp's and botocore's errors are not ``OSError``)."""
    from pipeline import storage

    return isinstance(e, OSError | ValueError) or storage.is_access_error(e)


def with_recorded(now: dict[str, str], sources: list[dict], recorded: dict | None) -> dict[str, str]:
    """``now`` plus, for each input of ``sources`` that could not be fingerprinted now, its ``recorded``
    fingerprint: an input that is unreadable for a while (moved, its server down) leaves what was built current."""
    missing = {p for s in sources for p in input_paths(s)} - set(now)
    return {**{p: fp for p, fp in (recorded or {}).items() if p in missing}, **now}


def changed_input(saved: dict | None, now: dict[str, str]) -> str | None:
    """The first input whose recorded fingerprint differs from ``now``; None when none does or none is recorded."""
    for path, fp in (saved or {}).items():
        if path in now and now[path] != fp:
            return path
    return None


def changed_since(plan: dict, sources: list[dict], storage_options: dict | None, allow_private: bool) -> str | None:
    """The first input file of ``plan`` that holds other contents now than it was planned from; None when none does,
    or when the plan recorded none (one from before inputs were recorded: unknown, not changed)."""
    if not sources or not plan.get("inputs"):
        return None
    return changed_input(plan["inputs"], fingerprint_inputs(sources, storage_options, allow_private))


def changed_message(dst: str, path: str) -> str:
    """The one line refusing to resume ``dst`` after ``path`` was rewritten."""
    return (
        f"{dst} was planned from other contents of {path} (it changed since): use another --out to scrape its new "
        "contents (an incremental run, --incremental into a versioned output, adds each change as a new version)"
    )


def _path_fingerprint(source: dict, path: str, storage_options: dict | None, allow_private: bool) -> str:
    from pipeline.shards import expand_urls
    from pipeline.sources.records import guarded_options, refusals_as_errors

    parts = []
    for pattern in expand_urls(path):
        opts = guarded_options(pattern, storage_options, allow_private)
        with refusals_as_errors(pattern):
            parts += [(f, file_fingerprint(f, opts)) for f in _files(source, pattern, opts)]
    if len(parts) == 1 and parts[0][0] == path:
        return parts[0][1]
    return "files:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _files(source: dict, path: str, opts: dict) -> list[str]:
    """``path`` itself, or the files of a directory the source reads (a URL list's ``*.<format>``, a folder)."""
    import fsspec

    if path.split("://", 1)[0] in ("http", "https"):  # HTTP's isdir GETs the whole body to look for links
        return [path]
    fs, fs_path = fsspec.core.url_to_fs(path, **opts)
    if not fs.isdir(fs_path):
        return [path]
    if source.get("kind") == "url_list":
        from pipeline.sources.url_list import infer_format

        fmt = source.get("input_format") or infer_format(path)
        found = fs.glob(fs_path.rstrip("/") + "/*." + fmt)
    else:
        root = fs_path.rstrip("/") + "/"  # a local HF folder: its .git/ and other dot entries are no data
        found = [f for f in fs.find(fs_path) if not any(p.startswith(".") for p in f[len(root) :].split("/"))]
    return [fs.unstrip_protocol(f) for f in sorted(found)]


def file_fingerprint(url: str, opts: dict) -> str:
    """``sha256:<hex>`` of a file's bytes, or ``size:<n>;stamp:<etag or mtime>`` for one over ``HASH_LIMIT``
    (``partial-sha256:<hex>;stamp:<...>`` when its size is unknown and it reads past ``HASH_LIMIT``)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **opts)
    try:
        info = fs.info(path)
    except (OSError, ValueError):  # an HTTP server that answers no HEAD: read it, as the source will
        info = {}
    size = info.get("size")
    if size is not None and size > HASH_LIMIT:
        stamp = next((str(info[k]) for k in STAMP_KEYS if info.get(k)), "")
        return f"size:{size};stamp:{stamp}"
    digest, read = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while read < HASH_LIMIT and (chunk := f.read(min(READ_BYTES, HASH_LIMIT - read))):
            digest.update(chunk)
            read += len(chunk)
        more = read >= HASH_LIMIT and f.read(1)  # a size-less stream past the limit: read no further
    if more:
        stamp = next((str(info[k]) for k in STAMP_KEYS if info.get(k)), "")
        return f"partial-sha256:{digest.hexdigest()};stamp:{stamp}"
    return "sha256:" + digest.hexdigest()
