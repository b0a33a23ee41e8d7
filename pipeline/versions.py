"""Dataset versions: incremental scrapes as a chain of delta datasets under one root, read as a whole without copies.

Layout of a versioned dataset (local path or fsspec URL)::

    DATASET/
      versions.json     the index: one row per complete version (number, path, parent, counts, created_at, code)
      v0001/            a full dataset per the data contract (shards, parquet, _stats.json, sizes.json, manifest)
      v0002/            a *delta*: only the samples added since v0001; its manifest has "version": 2,
                        "delta": true and "parent": "../v0001/manifest.json" (relative, so a moved or copied
                        root reads its own versions; absolute parents of older manifests still resolve)

- Keys stay unique across the family: a version's shard indices continue after the highest index of its
  ancestors, and keys are shard index + position (``pipeline.scrape.sample_key``).
- "Version N as a whole" is its ancestors' shards plus its own, in that order: :func:`version_shards`, and
  ``pipeline.shards.shard_urls`` follows a delta manifest's parent (a root with ``versions.json`` reads as its
  latest version), so trainers and curation take a version directory, or the root, unchanged.
- What an incremental run skips comes from the ancestors' parquet files, not from a separate database: a URL is
  *seen* once any ancestor attempted it with a final outcome (transient failures are tried again by the next
  version), and image bytes are *stored* when an ancestor kept a sample with that content sha256. Both sets are
  held as sorted arrays of digests (16 bytes a URL, 32 bytes a sha256), so a million rows cost tens of MB.
- A version is complete when its ``manifest.json`` exists; the index is rebuilt from the manifests after every
  run (:func:`write_index`), and :func:`list_versions` rebuilds it when it misses a complete version, so a run
  killed between the two leaves nothing inconsistent. A killed run leaves an
  incomplete ``vNNNN/``, which the next incremental run resumes with its original plan.
- Every run writes a version, even one that adds nothing: the version records that the run happened and what
  it skipped (``seen_url`` before download, ``seen_content`` after).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from pipeline import shards, storage

INDEX_NAME = "versions.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")
PLAIN_LEFTOVER_RE = re.compile(r"^(_inputs|\d{6}(\.tar|\.parquet|_stats\.json))$")  # a plain scrape's plan and shards
SEEN_URL = "seen_url"  # extraction drop: the URL was attempted by an earlier version
SEEN_CONTENT = "seen_content"  # download drop: the same bytes were stored by an earlier version


def version_dir_name(number: int) -> str:
    """``v0001`` for version 1 (four digits at least, so listings sort)."""
    if number < 1:
        raise ValueError(f"version numbers start at 1, got {number}")
    return f"v{number:04d}"


def version_url(root: str, number: int) -> str:
    """The directory of version ``number`` under a versioned dataset root."""
    return storage.join(root, version_dir_name(number))


def manifest_url(dataset_url: str) -> str:
    """The manifest URL of a dataset directory (a ``.json`` URL is returned as is)."""
    return dataset_url if dataset_url.endswith(".json") else storage.join(dataset_url, "manifest.json")


def _base(dataset_url: str) -> str:
    return (posixpath.dirname(dataset_url) or ".") if dataset_url.endswith(".json") else dataset_url.rstrip("/")


def _absolute(url: str) -> str:
    return os.path.abspath(url) if "://" not in url else url


# ---------------------------------------------------------------------------------------------- the family


def is_versioned(root: str, storage_options: dict | None = None) -> bool:
    """Whether ``root`` holds a versions index."""
    return storage.exists(storage.join(root, INDEX_NAME), storage_options)


def scan_versions(root: str, storage_options: dict | None = None) -> list[tuple[int, str]]:
    """(number, directory URL) of every complete version under ``root`` (its manifest exists), oldest first."""
    found = []
    for name in storage.listdir(root, storage_options):
        m = VERSION_RE.match(name)
        if m and storage.exists(storage.join(root, name, "manifest.json"), storage_options):
            found.append((int(m.group(1)), storage.join(root, name)))
    return sorted(found)


def ancestry(dataset_url: str, storage_options: dict | None = None) -> list[tuple[str, dict]]:
    """(directory URL, manifest) of a dataset and the versions it inherits from, oldest first.

    A plain dataset (no ``"delta"`` in its manifest) is its own whole; its ``parent`` is lineage, not inheritance.
    """
    chain: list[tuple[str, dict]] = []
    url: str | None = manifest_url(dataset_url)
    while url is not None:
        if not storage.exists(url, storage_options):
            raise FileNotFoundError(f"manifest not found: {url}")
        manifest = storage.read_json_object(url, storage_options)
        chain.append((_base(url), manifest))
        parent = manifest.get("parent") if manifest.get("delta") else None
        url = storage.resolve_ref(_base(url), parent) if parent else None
        if len(chain) > 100_000:
            raise ValueError(f"{dataset_url}: the parent chain of its versions loops")
    return chain[::-1]


def resolve(dataset: str, version: int | None = None, storage_options: dict | None = None) -> str:
    """The directory of one version: ``version`` of the root ``dataset``, else its latest, else ``dataset`` itself."""
    dataset = _base(dataset)
    if version is not None:
        url = version_url(dataset, version)
        if not storage.exists(manifest_url(url), storage_options):
            raise FileNotFoundError(f"{dataset} has no complete version {version}")
        return url
    if storage.exists(manifest_url(dataset), storage_options):
        return dataset
    found = scan_versions(dataset, storage_options)
    if not found:
        raise FileNotFoundError(f"no manifest and no versions in {dataset}")
    return found[-1][1]


def input_manifest_url(src: str, storage_options: dict | None = None) -> str | None:
    """The manifest URL of a stage's input, recorded as its output's parent: a dataset's own, a versioned root's
    latest version's (what the stage reads), the manifest itself; None for shard patterns and unfinished input."""
    if "{" in src or "::" in src or src.endswith(".tar"):  # a shard pattern: no manifest
        return None
    if src.endswith(".json") and not src.endswith(INDEX_NAME):  # the manifest itself
        return src if storage.exists(src, storage_options) else None
    try:
        return manifest_url(resolve(src, None, storage_options))
    except FileNotFoundError:  # neither a manifest nor a complete version
        return None


def version_shards(dataset: str, storage_options: dict | None = None) -> tuple[list[str], list[int]]:
    """Shard URLs of a version as a whole (ancestors' then its own) and their sample counts, from the manifests."""
    urls, sizes = [], []
    for base, manifest in ancestry(resolve(dataset, None, storage_options), storage_options):
        for s in manifest["shards"]:
            urls.append(storage.join(base, s["name"]))
            sizes.append(int(s["samples"]))
    return urls, sizes


# ----------------------------------------------------------------------------------------- what was seen


class DigestSet:
    """A compact read-only set of equal-length digests: a sorted numpy byte-string array, binary search."""

    def __init__(self, digests: Iterable[bytes], width: int):
        arr = np.array(list(digests), dtype=f"S{width}")
        arr, first = np.unique(arr, return_index=True)  # sorted, one of each
        self.arr = arr
        self.first = first  # position in the input of each kept digest (to align values with it)

    def __len__(self) -> int:
        return len(self.arr)

    def index(self, digest: bytes) -> int:
        """Position of ``digest`` in the sorted array, or -1."""
        lo = int(np.searchsorted(self.arr, digest, side="left"))
        hi = int(np.searchsorted(self.arr, digest, side="right"))  # numpy's own comparison: no trailing-NUL trap
        return lo if hi > lo else -1

    def __contains__(self, digest: bytes) -> bool:
        return self.index(digest) >= 0


def url_digest(url: str) -> bytes:
    """16-byte digest of a URL (BLAKE2b), the unit of the seen-URL set."""
    return hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class SeenUrls:
    """URLs an earlier version attempted with a final outcome; ``url in seen`` works on plain strings."""

    def __init__(self, urls: Iterable[str]):
        self._set = DigestSet((url_digest(u) for u in urls), 16)

    def __len__(self) -> int:
        return len(self._set)

    def __contains__(self, url: object) -> bool:
        return isinstance(url, str) and url_digest(url) in self._set


class StoredContent:
    """sha256 of every sample an earlier version stored, with the (first) key that holds it."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):  # (sha256 hex, key)
        shas, keys = [], []
        for sha, key in pairs:
            shas.append(bytes.fromhex(sha))
            keys.append(key.encode())
        self._set = DigestSet(shas, 32)
        self._keys = np.array(keys, dtype=bytes)[self._set.first] if keys else np.empty(0, dtype="S1")

    def __len__(self) -> int:
        return len(self._set)

    def key_of(self, sha256_hex: str) -> str | None:
        """The stored key with this content, or None."""
        i = self._set.index(bytes.fromhex(sha256_hex))
        return None if i < 0 else self._keys[i].decode()


def _parquet_rows(tar_urls: list[str], columns: list[str], storage_options: dict | None):
    """Yield the ``columns`` of the parquet file beside each tar as a dict of lists."""
    import fsspec
    import pyarrow.parquet as pq

    for url in tar_urls:
        with fsspec.open(url[: -len(".tar")] + ".parquet", "rb", **(storage_options or {})) as f:
            yield pq.read_table(f, columns=columns, use_threads=False).to_pydict()


def seen_urls(dataset: str, storage_options: dict | None = None) -> SeenUrls:
    """The URLs a version and its ancestors attempted with a final outcome (transient failures are not seen)."""
    from pipeline.scrape import is_transient

    urls, _ = version_shards(dataset, storage_options)
    return SeenUrls(
        u
        for cols in _parquet_rows(urls, ["url", "status"], storage_options)
        for u, s in zip(cols["url"], cols["status"], strict=True)
        if u and not is_transient(str(s))
    )


def stored_content(dataset: str, storage_options: dict | None = None) -> StoredContent:
    """The content hashes of every sample a version and its ancestors kept."""
    urls, _ = version_shards(dataset, storage_options)
    return StoredContent(
        (h, k)
        for cols in _parquet_rows(urls, ["key", "sha256", "status"], storage_options)
        for k, h, s in zip(cols["key"], cols["sha256"], cols["status"], strict=True)
        if s == "success" and h
    )


class SeenContentFetcher:
    """A fetcher whose downloads of bytes an earlier version stored come back as ``seen_content`` drops."""

    def __init__(self, fetcher, stored: StoredContent):
        self.fetcher = fetcher
        self.stored = stored

    def submit(self, url: str, kind: str = "image") -> cf.Future:
        """Like the wrapped fetcher's ``submit``; the result is checked against the stored content."""
        outer: cf.Future = cf.Future()

        def done(inner: cf.Future) -> None:
            if outer.cancelled():
                return
            try:
                outer.set_result(self.check(inner.result()))
            except BaseException as e:  # noqa: BLE001 (handed to the waiting scraper as is)
                outer.set_exception(e)

        self.fetcher.submit(url, kind).add_done_callback(done)
        return outer

    def check(self, result):
        """The FetchResult as is, or turned into a ``seen_content`` drop (body released)."""
        if not result.ok or not result.body:
            return result
        key = self.stored.key_of(hashlib.sha256(result.body).hexdigest())
        if key is None:
            return result
        return dataclasses.replace(
            result, status=SEEN_CONTENT, body=None, error=f"same bytes as sample {key} of an earlier version"
        )

    def __getattr__(self, name: str):
        return getattr(self.fetcher, name)


# ----------------------------------------------------------------------------------------- the next version


@dataclass(frozen=True)
class NextVersion:
    """Where an incremental run writes, and what it builds on."""

    root: str  # the versioned dataset root
    number: int  # this version's number (1 for the first)
    url: str  # this version's directory
    parent: str | None  # the previous version's manifest URL; None for version 1
    start_index: int  # first shard index of this version (after every ancestor's shards)


WRITER_LOCK = ".writer.lock"  # in a local versioned root: held by the incremental scrape writing its next version


@contextlib.contextmanager
def writer_lock(root: str, storage_options: dict | None = None):
    """Hold a local versioned root for one incremental scrape: a second one started meanwhile (a scheduled run and a
    manual one) fails in one line instead of writing the same version. An flock, so a killed writer releases it.
    Object stores have no such lock: there, one run at a time is the scheduler's job (a deployment's runs are)."""
    if not storage.is_local(root):
        yield
        return
    import fcntl

    path = os.path.join(storage.local_path(root), WRITER_LOCK)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"{root}: another incremental scrape is writing its next version; run again when it has finished"
            ) from None
        yield
    finally:
        os.close(fd)


def next_version(root: str, storage_options: dict | None = None) -> NextVersion:
    """The version an incremental run on ``root`` writes: an unfinished one is resumed, else latest + 1."""
    root = _absolute(root.rstrip("/"))
    if storage.exists(manifest_url(root), storage_options):
        raise ValueError(f"{root} is a plain dataset (it has a manifest.json); give a new directory for versions")
    leftover = next((n for n in storage.listdir(root, storage_options) if PLAIN_LEFTOVER_RE.match(n)), None)
    if leftover:  # v0001 beside them would make the folder versioned, and the plain scrape could never resume
        raise ValueError(
            f"{root} holds an unfinished plain scrape ({leftover}, no manifest.json); finish it without "
            "--incremental, or give a new directory for versions"
        )
    found = scan_versions(root, storage_options)
    if not found:
        return NextVersion(root, 1, version_url(root, 1), None, 0)
    number, last = found[-1]
    urls, _ = version_shards(last, storage_options)
    start = max((int(u.rsplit("/", 1)[-1][:6]) for u in urls), default=-1) + 1
    return NextVersion(root, number + 1, version_url(root, number + 1), manifest_url(last), start)


def stamp_manifest(manifest: dict, target: NextVersion, storage_options: dict | None = None) -> dict:
    """Mark a freshly built manifest as version ``target.number`` (a delta of its parent) with family totals."""
    samples, shards_ = manifest["samples"], len(manifest["shards"])
    if target.parent is not None:  # the parent's totals already cover its own ancestors
        parent = storage.read_json_object(target.parent, storage_options)
        samples += parent.get("total_samples", parent["samples"])
        shards_ += parent.get("total_shards", len(parent["shards"]))
    parent = None if target.parent is None else "/".join(["..", *target.parent.rstrip("/").split("/")[-2:]])
    manifest.update(
        version=target.number,
        delta=target.parent is not None,
        parent=parent,  # ../vNNNN/manifest.json: the versions live side by side under one root
        versions_root=target.root,
        total_samples=samples,
        total_shards=shards_,
    )
    return manifest


# -------------------------------------------------------------------------------------------------- index


def index_row(number: int, url: str, manifest: dict) -> dict:
    """One row of ``versions.json`` from a version's manifest."""
    parent = manifest.get("parent") if manifest.get("delta") else None
    parent_dir = _base(parent).rsplit("/", 1)[-1] if parent else None
    m = VERSION_RE.match(parent_dir or "")
    return {
        "version": number,
        "path": version_dir_name(number),
        "url": url,
        "parent": int(m.group(1)) if m else None,
        "created_at": manifest.get("created_at"),
        "code_version": manifest.get("code_version"),
        "samples": manifest.get("total_samples", manifest["samples"]),  # the version as a whole
        "shards": manifest.get("total_shards", len(manifest["shards"])),
        "samples_added": manifest["samples"],
        "shards_added": len(manifest["shards"]),
        "records": manifest.get("stats", {}).get("seen", 0),  # records this version attempted
        "skipped_seen_url": (manifest.get("extraction") or {}).get(SEEN_URL, 0),
        "skipped_seen_content": manifest.get("stats", {}).get("dropped", {}).get(SEEN_CONTENT, 0),
    }


def build_index(root: str, storage_options: dict | None = None) -> list[dict]:
    """The index rows of every complete version, from their manifests."""
    return [index_row(n, url, storage.read_json_object(manifest_url(url), storage_options))
            for n, url in scan_versions(root, storage_options)]  # fmt: skip


def write_index(root: str, storage_options: dict | None = None) -> list[dict]:
    """Rebuild ``versions.json`` from the manifests and write it atomically; returns its rows."""
    rows = build_index(root, storage_options)
    doc = {"dataset": root, "updated_at": datetime.now(UTC).isoformat(timespec="seconds"), "versions": rows}
    storage.write_whole(storage.join(root, INDEX_NAME), json.dumps(doc, indent=1).encode(), storage_options)
    return rows


def list_versions(root: str, storage_options: dict | None = None) -> list[dict]:
    """The versions of a dataset, oldest first: ``versions.json``, rebuilt from the manifests when it is missing or
    does not list exactly the complete versions (a run killed between its manifest and the index)."""
    root = _base(root)
    if is_versioned(root, storage_options):
        url = storage.join(root, INDEX_NAME)
        rows = storage.read_json_object(url, storage_options).get("versions")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "version" in r for r in rows):
            raise ValueError(f"{url}: not a versions index (no list of versions)")
        if [r["version"] for r in rows] == [n for n, _ in scan_versions(root, storage_options)]:
            return rows
    rows = build_index(root, storage_options)
    if not rows:
        raise FileNotFoundError(f"{root} has no versions (no {INDEX_NAME} and no vNNNN/manifest.json)")
    return rows


def format_versions(rows: list[dict]) -> str:
    """The versions as a plain text table (what ``altforge versions`` prints)."""
    cols = ["version", "parent", "samples", "shards", "samples_added", "records", "skipped_seen_url",
            "skipped_seen_content", "created_at", "code_version"]  # fmt: skip
    table = [cols] + [["" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in table)


# --------------------------------------------------------------------------------------------------- diff


def dataset_keys(dataset: str, storage_options: dict | None = None) -> set[str]:
    """Keys of the samples a dataset holds as a whole (version, plain directory or manifest), from its parquet."""
    urls = shards.shard_urls(dataset, storage_options)
    return {
        k
        for cols in _parquet_rows(urls, ["key", "status"], storage_options)
        for k, s in zip(cols["key"], cols["status"], strict=True)
        if s == "success"
    }


def diff(old: str, new: str, storage_options: dict | None = None) -> dict:
    """Keys added and removed going from dataset ``old`` to ``new`` (versions, directories or manifests), counts."""
    a, b = dataset_keys(old, storage_options), dataset_keys(new, storage_options)
    added, removed = sorted(b - a), sorted(a - b)
    return {
        "old": old,
        "new": new,
        "added": added,
        "removed": removed,
        "n_added": len(added),
        "n_removed": len(removed),
        "n_common": len(a & b),
        "samples_old": len(a),
        "samples_new": len(b),
    }


def diff_versions(root: str, old: int, new: int, storage_options: dict | None = None) -> dict:
    """:func:`diff` between two version numbers of a versioned dataset (``altforge versions ROOT --diff A B``)."""
    out = diff(resolve(root, old, storage_options), resolve(root, new, storage_options), storage_options)
    return {**out, "old_version": old, "new_version": new}
