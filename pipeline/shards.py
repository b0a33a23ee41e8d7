"""WebDataset shards with the altforge contract: tar + parquet + _stats.json, published atomically.

A shard ``NNNNNN`` is *done* when ``NNNNNN.tar``, ``NNNNNN.parquet`` and ``NNNNNN_stats.json`` all exist. This
module finds the done shards of a dataset and reads them back; writing and publishing them is
:mod:`pipeline.shard_writer`, whose names are re-exported here so that ``shards.ShardWriter`` and the rest keep
working.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.shard_writer import (  # re-exported
    BASE_COLUMNS,
    TAR_FORMAT,
    TMP_PREFIX,
    ShardSink,
    ShardWriter,
    arrow_array,
    clean_temporaries,
    encode_field,
    sha256_file,
    shard_files,
    shard_name,
    without_lone_surrogates,
    write_parquet,
)

__all__ = [
    "BASE_COLUMNS",
    "IMAGE_EXTS",
    "SHARD_RE",
    "TAR_FORMAT",
    "TMP_PREFIX",
    "ShardSink",
    "ShardWriter",
    "arrow_array",
    "clean_temporaries",
    "decode_field",
    "done_shards",
    "encode_field",
    "expand_urls",
    "first_image",
    "is_done",
    "iter_samples",
    "read_parquet",
    "read_shard_stats",
    "sha256_file",
    "shard_files",
    "shard_name",
    "shard_urls",
    "without_lone_surrogates",
    "write_parquet",
    "write_sizes",
]

SHARD_RE = re.compile(r"^(\d{6})\.tar$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image fields a sample may carry, in the order they are looked for


def decode_field(ext: str, data: bytes):
    """Inverse of :func:`encode_field` for the common extensions; image bytes stay bytes."""
    if ext.endswith("json"):
        return json.loads(data)
    if ext in ("txt", "text", "caption") or ext.endswith(".txt"):
        return data.decode("utf-8")
    if ext.endswith("npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    return data


def done_shards(dataset_url: str, storage_options: dict | None = None) -> list[str]:
    """Names (``"000003"``) of the shards whose tar, parquet and stats all exist, sorted."""
    names = set(storage.listdir(dataset_url, storage_options))
    done = []
    for n in names:
        m = SHARD_RE.match(n)
        if m and f"{m.group(1)}.parquet" in names and f"{m.group(1)}_stats.json" in names:
            done.append(m.group(1))
    return sorted(done)


def is_done(dataset_url: str, index: int, storage_options: dict | None = None) -> bool:
    """Whether shard ``index`` is complete (a rerun skips it)."""
    files = shard_files(dataset_url, index)
    return all(storage.exists(files[k], storage_options) for k in ("stats", "tar", "parquet"))


def read_shard_stats(dataset_url: str, name: str, storage_options: dict | None = None) -> dict:
    """The ``_stats.json`` record of a done shard."""
    return json.loads(storage.read_bytes(storage.join(dataset_url, f"{name}_stats.json"), storage_options))


def write_sizes(dataset_url: str, storage_options: dict | None = None, sizes: dict[str, int] | None = None) -> dict:
    """Write ``sizes.json`` (``{"000000.tar": n_samples}``, the open_clip convention); default: the done shards."""
    if sizes is None:
        sizes = {
            f"{n}.tar": read_shard_stats(dataset_url, n, storage_options)["samples"]
            for n in done_shards(dataset_url, storage_options)
        }
    storage.write_bytes(storage.join(dataset_url, "sizes.json"), json.dumps(sizes, indent=1).encode(), storage_options)
    return sizes


# ---------------------------------------------------------------------------------------------------- reading


_LIST_SEPARATOR = re.compile(r"::(?![^\[]*\])")  # not inside [...]


def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """Expand brace notation (``data/{000000..000009}.tar``) and ``::``-separated lists into shard URLs (a ``::``
    inside an IPv6 host's brackets, ``http://[::1]/a.tar``, separates nothing)."""
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        for part in _LIST_SEPARATOR.split(s):
            out.extend(braceexpand.braceexpand(part))
    return out


def shard_urls(source: str, storage_options: dict | None = None) -> list[str]:
    """Tar URLs of a dataset: a directory (its manifest, else its done shards), a manifest.json, or a pattern.

    A dataset version (``pipeline.versions``: a manifest with ``"delta": true``) reads as a whole: its parent's
    shards, then its own. A versioned root (a ``versions.json`` and no manifest) reads as its latest version.
    """
    if "{" in source or "::" in source or source.endswith(".tar"):
        return expand_urls(source)
    if source.endswith("versions.json"):  # a versioned root's index: the root
        source = posixpath.dirname(source) or "."
    manifest_url = source if source.endswith(".json") else storage.join(source, "manifest.json")
    base = (posixpath.dirname(source) or ".") if source.endswith(".json") else source
    if storage.exists(manifest_url, storage_options):
        manifest = storage.read_json_object(manifest_url, storage_options)
        shards = manifest.get("shards")
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards
        ):
            raise ValueError(f"{manifest_url}: not a dataset manifest (no shards list)")
        own = [storage.join(base, s["name"]) for s in shards]
        if manifest.get("delta") and manifest.get("parent"):  # relative to this version's directory
            return shard_urls(storage.resolve_ref(base, manifest["parent"]), storage_options) + own
        return own
    if source.endswith(".json"):
        raise FileNotFoundError(f"manifest not found: {manifest_url}")
    if storage.exists(storage.join(base, "versions.json"), storage_options):
        from pipeline.versions import resolve

        return shard_urls(resolve(base, None, storage_options), storage_options)
    return [storage.join(base, f"{n}.tar") for n in done_shards(base, storage_options)]


def first_image(sample: dict) -> bytes | None:
    """The bytes of a sample's first image field (``IMAGE_EXTS`` order), if any."""
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def iter_samples(
    url: str,
    storage_options: dict | None = None,
    decode: bool = True,
    errors: Counter | None = None,
) -> Iterator[dict]:
    """Yield the samples of one tar shard as ``{"__key__", "__url__", ext: value}`` dicts, streamed.

    A corrupt or truncated shard stops with the samples read so far (the last one, which may have lost members,
    is dropped); the problem is counted in ``errors`` (``corrupt_shard``) when given, otherwise raised. tarfile
    ends quietly at a bad header or a cut one, so the archive must end with its end-of-archive block to count as
    whole. Members of one sample are consecutive, with one key, one directory and no extension twice.
    """
    import fsspec

    current: dict | None = None
    group = None  # (directory, key) of the current sample
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            tail = _TailReader(f)
            with tarfile.open(fileobj=tail, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    data = tar.extractfile(member).read()
                    # another directory is another sample (webdataset keeps it in the key); an extension seen
                    # twice is a repeated key, yielded twice so that the consumers count or refuse it
                    if current is not None and ((folder, key) != group or ext in current):
                        yield current
                        current = None
                    if current is None:
                        current, group = {"__key__": key, "__url__": url}, (folder, key)
                    current[ext] = decode_field(ext, data) if decode else data
                end = tail.bytes_at(tar.offset, 2 * tarfile.BLOCKSIZE)  # where the member headers stopped
            if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):  # one zero block then EOF is an end, as for GNU tar
                raise tarfile.ReadError("no end-of-archive block after the last member (truncated or corrupt)")
    except (tarfile.TarError, EOFError, OSError):
        if errors is None:
            raise
        errors["corrupt_shard"] += 1
        current = None  # the last sample may be incomplete: drop it, counted above
    if current is not None:
        yield current


class _TailReader:
    """A read-only file wrapper that keeps the last bytes read, so a streamed tar's end can be checked (s3 too)."""

    KEEP = 1 << 16  # more than tarfile reads ahead of its position (one 10 KiB record) plus the two end blocks

    def __init__(self, f):
        self.f, self.pos, self.held, self.chunks = f, 0, 0, deque()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.pos += len(data)
        self.held += len(data)
        self.chunks.append(data)
        while self.held - len(self.chunks[0]) >= self.KEEP:
            self.held -= len(self.chunks.popleft())
        return data

    def bytes_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of the file from ``offset`` (fewer at its end), reading on as needed."""
        while self.pos < offset + size and self.read(offset + size - self.pos):
            pass
        start = self.pos - self.held
        if offset < start:
            raise tarfile.ReadError(f"tar position {offset} is behind the bytes kept (from {start})")
        return b"".join(self.chunks)[offset - start : offset - start + size]


def read_parquet(dataset_url: str, storage_options: dict | None = None):
    """All parquet rows of a dataset as one pandas DataFrame: the shards :func:`shard_urls` reads (a version as a
    whole, a root as its latest version, a directory without a manifest as its done shards).

    Every parquet read in the project passes ``use_threads=False``: with pyarrow's thread pool, a command that had
    read parquet aborted at exit ("terminate called without an active exception", status 134) in about a third
    of runs here, after printing its results. These tables are one shard's rows; one thread reads them as fast.
    """
    import fsspec
    import pandas as pd

    frames = []
    for url in shard_urls(dataset_url, storage_options):
        with fsspec.open(url.removesuffix(".tar") + ".parquet", "rb", **(storage_options or {})) as f:
            frames.append(pq.read_table(f, use_threads=False).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BASE_COLUMNS.names)
