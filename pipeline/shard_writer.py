"""Writing shards: the tar, the parquet and the ``_stats.json`` of one shard, published atomically.

A shard ``NNNNNN`` is *done* when ``NNNNNN.tar``, ``NNNNNN.parquet`` and ``NNNNNN_stats.json`` all exist. The
writer builds all three under temporary names and publishes them in that order, the stats file last, so a
process killed at any moment leaves either a finished shard or nothing a reader would take for one. Reading them
back is :mod:`pipeline.shards`, which also re-exports every name here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.stats import StageStats

TMP_PREFIX = storage.TMP_PREFIX
# PAX, not USTAR: a member name past 100 bytes gets an extended header instead of failing the shard; shorter ASCII
# names write the same bytes as USTAR did, so earlier shards stay byte-identical
TAR_FORMAT = tarfile.PAX_FORMAT

# One parquet row per attempted input record; stages add their own columns (clip_score, ...).
BASE_COLUMNS = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),  # "success" or the snake_case reason it was dropped
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)


def shard_name(index: int) -> str:
    """Zero-padded six-digit shard name, so brace notation ``{000000..000127}`` works."""
    if not 0 <= index < 1_000_000:
        raise ValueError(f"shard index out of range: {index}")
    return f"{index:06d}"


def shard_files(dataset_url: str, index: int) -> dict[str, str]:
    """URLs of the three files of shard ``index``."""
    name = shard_name(index)
    return {
        "tar": storage.join(dataset_url, f"{name}.tar"),
        "parquet": storage.join(dataset_url, f"{name}.parquet"),
        "stats": storage.join(dataset_url, f"{name}_stats.json"),
    }


def encode_field(ext: str, value) -> bytes:
    """Serialise one sample field for the tar: bytes as is, str as UTF-8, dict/list as JSON, arrays as .npy."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, np.ndarray):
        if not ext.endswith("npy"):
            raise ValueError(f"array field '{ext}' must use a .npy extension")
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, dict | list):
        return _utf8(json.dumps(value, ensure_ascii=False, sort_keys=True, default=_json_default))
    if isinstance(value, int | float):
        return str(value).encode("utf-8")
    raise TypeError(f"cannot store field '{ext}' of type {type(value).__name__}")


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; a lone surrogate (a "\\ud83d" escape in JSON metadata, an emoji cut in half by the
    tool that wrote it) becomes U+FFFD instead of failing the shard."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return without_lone_surrogates(text).encode("utf-8")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class ShardWriter:
    """Write one shard; call :meth:`publish` with the shard's stats to make it visible, or :meth:`abort`.

    Used as a context manager, an exception inside the block aborts the shard (temporary files removed).
    Samples may be written in any order (e.g. as downloads complete): the published tar and parquet are in key
    order, so the same input gives byte-identical shards.
    """

    def __init__(self, dataset_url: str, index: int, storage_options: dict | None = None):
        self.dataset_url = dataset_url
        self.index = index
        self.name = shard_name(index)
        self.storage_options = storage_options or {}
        self.files = shard_files(dataset_url, index)
        self._local = storage.is_local(dataset_url)
        if self._local:
            root = dataset_url.removeprefix("file://")
            os.makedirs(root, exist_ok=True)
            self._tmp_dir = root  # same filesystem: os.replace is atomic
        else:  # spooled locally, uploaded at publish; a killed writer's spool is removed by the next writer
            self._tmp_dir, self._spool_lock = storage.open_spool()
        tag = f"{TMP_PREFIX}{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp = {k: os.path.join(self._tmp_dir, f"{tag}.{k}") for k in ("tar", "parquet", "stats")}
        self._tar = tarfile.open(self._tmp["tar"], "w", format=TAR_FORMAT)
        self._rows: list[dict] = []
        self._keys: set[str] = set()
        self._last_key = ""
        self._in_order = True
        self.n_samples = 0
        self.n_bytes = 0
        self._closed = False

    def write(self, sample: dict) -> None:
        """Add one sample: ``{"__key__": key, "jpg": bytes, "txt": str, "json": dict, ...}``."""
        key = sample["__key__"]
        if not key or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: keys must be non-empty and contain no '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self.name}")
        self._keys.add(key)
        if key < self._last_key:
            self._in_order = False
        self._last_key = max(self._last_key, key)
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = encode_field(ext, sample[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # reproducible shards: the same input gives the same bytes
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
            self.n_bytes += len(data)
        self.n_samples += 1

    def add_row(self, row: dict) -> None:
        """Add one parquet row (every attempted input record gets exactly one, failures included)."""
        self._rows.append(row)

    def publish(self, stats: StageStats, extra: dict | None = None) -> dict:
        """Finish the three files and move them to their final names; returns the shard's stats record."""
        if self._closed:
            raise RuntimeError(f"shard {self.name} already closed")
        self._tar.close()
        if not self._in_order:
            _sort_tar(self._tmp["tar"])
        self._rows.sort(key=lambda r: str(r.get("key") or ""))
        write_parquet(self._rows, self._tmp["parquet"])
        record = {
            "shard": self.name,
            "samples": self.n_samples,
            "rows": len(self._rows),
            "bytes": os.path.getsize(self._tmp["tar"]),
            "sha256": sha256_file(self._tmp["tar"]),
            **stats.to_dict(),
            **(extra or {}),
        }
        with open(self._tmp["stats"], "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        for kind in ("tar", "parquet", "stats"):  # stats last: it is the "done" marker
            self._move(self._tmp[kind], self.files[kind])
        self._closed = True
        self._cleanup()
        return record

    def abort(self) -> None:
        """Drop everything written so far; nothing becomes visible."""
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()
        except Exception:  # a broken tar is discarded anyway
            pass
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)
        self._cleanup()

    def _move(self, tmp_path: str, final_url: str) -> None:
        if self._local:
            os.replace(tmp_path, final_url.removeprefix("file://"))
        else:  # an object-store PUT of a complete local file is atomic: readers see all of it or nothing
            fs, path = storage.get_fs(final_url, self.storage_options)
            fs.put_file(tmp_path, path)
            os.remove(tmp_path)

    def _cleanup(self) -> None:
        if not self._local:
            storage.close_spool(self._tmp_dir, self._spool_lock)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.abort()
            raise RuntimeError(f"shard {self.name} left without publish(): discarded")


def _sort_tar(path: str) -> None:
    """Rewrite a tar with its samples in key order (members of one sample stay together, extension order kept)."""
    sorted_path = path + ".sorted"
    with tarfile.open(path, "r") as src, tarfile.open(sorted_path, "w", format=TAR_FORMAT) as dst:
        members = src.getmembers()  # headers only; bodies are streamed below
        order = sorted(range(len(members)), key=lambda i: (members[i].name.split(".", 1)[0], i))
        for i in order:
            dst.addfile(members[i], src.extractfile(members[i]))
    os.replace(sorted_path, path)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate (an undecodable tar name or header byte kept by surrogateescape, a cut
    ``\\ud83d`` JSON escape) replaced by U+FFFD, as the score tables and parquets store such strings."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def arrow_array(values: list, type=None) -> pa.Array:
    """``pa.array``, with strings that hold lone surrogates (undecodable header bytes a server sent, kept by
    surrogateescape) written with U+FFFD in their place instead of failing the whole shard."""
    try:
        return pa.array(values, type=type)
    except UnicodeEncodeError:
        clean = [without_lone_surrogates(v) if isinstance(v, str) else v for v in values]
        return pa.array(clean, type=type)


def write_parquet(rows: list[dict], path: str) -> None:
    """Write rows with the base columns first (typed) and any stage columns after them."""
    extra: list[str] = []
    for row in rows:
        for k in row:
            if k not in BASE_COLUMNS.names and k not in extra:
                extra.append(k)
    columns = {}
    for field in BASE_COLUMNS:
        columns[field.name] = arrow_array([r.get(field.name) for r in rows], field.type)
    for k in extra:
        values = [r.get(k) for r in rows]
        if any(isinstance(v, dict | list) for v in values):
            values = [None if v is None else json.dumps(v, sort_keys=True) for v in values]
        columns[k] = arrow_array(values)
    pq.write_table(pa.table(columns), path, compression="zstd")


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardSink:
    """Write samples into consecutive size-bounded shards (for resharding stages); each is published atomically."""

    def __init__(
        self,
        dataset_url: str,
        start_index: int = 0,
        max_samples: int = 10_000,  # samples per shard
        max_bytes: int = 1 << 30,  # bytes of tar payload per shard
        storage_options: dict | None = None,
    ):
        self.dataset_url = dataset_url
        self.next_index = start_index
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.storage_options = storage_options
        self.published: list[dict] = []
        self._writer: ShardWriter | None = None
        self._stats = StageStats()

    def write(self, sample: dict, row: dict | None = None) -> None:
        """Add a kept sample (and its parquet row); rolls to a new shard when the current one is full."""
        w = self._current()
        w.write(sample)
        if row is not None:
            w.add_row(row)
        self._stats.kept += 1
        self._stats.seen += 1
        if w.n_samples >= self.max_samples or w.n_bytes >= self.max_bytes:
            self._flush()

    def _current(self) -> ShardWriter:
        if self._writer is None:
            self._writer = ShardWriter(self.dataset_url, self.next_index, self.storage_options)
            self.next_index += 1
            self._stats = StageStats()
        return self._writer

    def _flush(self) -> None:
        if self._writer is not None:
            self.published.append(self._writer.publish(self._stats))
            self._writer = None

    def close(self) -> list[dict]:
        """Publish the last partial shard; returns the stats records of every shard written."""
        self._flush()
        return self.published

    def abort(self) -> None:
        """Discard the shard in progress (already published shards stay)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def clean_temporaries(dataset_url: str, storage_options: dict | None = None) -> int:
    """Remove temporary files a killed writer left behind (in the dataset, and the local spools of object-store
    writers); returns how many were removed."""
    n = 0 if storage.is_local(dataset_url) else storage.remove_dead_spools()
    for name in storage.listdir(dataset_url, storage_options):
        if name.startswith(TMP_PREFIX):
            storage.remove(storage.join(dataset_url, name), storage_options)
            n += 1
    return n
