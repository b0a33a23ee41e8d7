"""fsspec helpers: one way to open, list, move and remove files on local paths, file://, s3://, gs:// ..."""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid

import fsspec
from fsspec.core import url_to_fs

TMP_PREFIX = ".tmp-"  # temporary files beside the final ones; a killed writer's are removed by the next
SPOOL_PREFIX = "altforge-shard-"  # local spool directories of object-store writers: altforge-shard-PID-XXXX
SPOOL_LOCK = ".lock"  # inside a spool, flock'ed by its writer while it lives


def options_from_json(text: str | None) -> dict | None:
    """``--storage-options`` text as fsspec options: a JSON object, None when empty; ValueError (one line) else."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--storage-options: give a JSON object, not {type(value).__name__}")
    return value


# Credential entries of fsspec options (s3fs key/secret/token and client_kwargs' aws_*_key*, gcsfs token, adlfs
# account_key/sas_token/connection_string/client_secret, passwords): never written into a manifest.
_SECRET_NAME = re.compile(r"secret|token|passw|credential|connection_string|(^|_)key($|_)", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_secrets(value):
    """A copy of ``value`` (JSON-like) with the credential entries of every ``storage_options`` in it redacted."""
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: _redact_options(v) if k == "storage_options" else redact_secrets(v) for k, v in value.items()}


def _redact_options(value):
    if isinstance(value, str) and value.lstrip().startswith("{"):  # a trainer's --storage-options JSON text
        try:
            return json.dumps(_redact_options(json.loads(value)))
        except json.JSONDecodeError:
            return REDACTED
    if isinstance(value, list):
        return [_redact_options(v) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: REDACTED if _SECRET_NAME.search(str(k)) else _redact_options(v) for k, v in value.items()}


def get_fs(url: str, storage_options: dict | None = None):
    """Return ``(filesystem, path)`` for a local path or fsspec URL; one-line ``ValueError`` for a scheme fsspec
    does not know or whose package is not installed (``gs://`` without gcsfs)."""
    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise ValueError(f"{url}: {(str(e) or type(e).__name__).splitlines()[0]}") from None


def join(base: str, *parts: str) -> str:
    """Join URL/path components with ``/`` (works for local paths and URLs alike)."""
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else posixpath.join(base, *parts)


def resolve_ref(base: str, ref: str) -> str:
    """``ref`` as stored in a manifest (a URL, an absolute path, or a path relative to the directory ``base``) as a
    URL or absolute path; relative references keep a dataset readable after it is moved or copied."""
    if "://" in ref or os.path.isabs(ref):
        return ref
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, ref))}"
    return os.path.normpath(os.path.join(os.path.abspath(base), ref))


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """A ``file://`` URL as the plain path it names (for code that goes on with ``os``); other URLs unchanged."""
    return url.removeprefix("file://") if url.startswith("file://") else url


def same_place(a: str, b: str) -> bool:
    """Whether two spellings name the same dataset location (``out`` and ``/abs/out``, ``file:///x`` and ``/x``)."""
    if is_local(a) and is_local(b):
        return os.path.realpath(local_path(a)) == os.path.realpath(local_path(b))
    return a.rstrip("/") == b.rstrip("/")


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether the file or directory exists."""
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """Read a whole (small) file."""
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def read_json_object(url: str, storage_options: dict | None = None) -> dict:
    """A small JSON file that must hold an object (a manifest, sizes.json, ...); one-line ``ValueError`` naming
    the file when it is not valid JSON (cut short by a full disk, say) or not an object."""
    try:
        doc = json.loads(read_bytes(url, storage_options))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{url}: expected a JSON object")
    return doc


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write a whole (small) file (not atomic; use :func:`publish` for that)."""
    fs, path = get_fs(url, storage_options)
    make_parent(fs, path)
    with fs.open(path, "wb") as f:
        f.write(data)


def is_access_error(e: BaseException) -> bool:
    """Whether ``e`` says that storage could not be reached or refused access (an endpoint down, wrong
    credentials, a timeout): botocore's and aiohttp's own errors are not ``OSError``."""
    if isinstance(e, PermissionError | ConnectionError | TimeoutError):
        return True
    return type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")


def access_error_line(e: BaseException) -> str:
    """``e`` (see :func:`is_access_error`) as one line."""
    first = (str(e) or "").strip().splitlines()
    return f"storage not accessible: {type(e).__name__}" + (f": {first[0]}" if first else "")


def make_parent(fs, path: str) -> None:
    """Create the folder of ``path`` on a filesystem that has folders; object stores need none, and s3fs would
    create a missing bucket (a typo in ``--out`` would make a new bucket rather than fail)."""
    parent = posixpath.dirname(path)
    if parent and getattr(fs, "root_marker", None) == "/":  # local and other hierarchical filesystems
        fs.makedirs(parent, exist_ok=True)


def write_whole(url: str, data: bytes, storage_options: dict | None = None, if_changed: bool = False) -> None:
    """Write a small file so that readers (and a rerun after a kill) see the old content or the new, never a part:
    locally through a temporary ``.tmp-`` name renamed into place; on object stores one PUT is atomic already.
    ``if_changed``: leave a file that holds ``data`` already untouched."""
    if if_changed and exists(url, storage_options) and read_bytes(url, storage_options) == data:
        return
    if not is_local(url):
        write_bytes(url, data, storage_options)
        return
    head, name = url.rsplit("/", 1) if "/" in url else (".", url)
    tmp = join(head, f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    write_bytes(tmp, data, storage_options)
    publish(tmp, url, storage_options)


def publish(tmp_url: str, final_url: str, storage_options: dict | None = None) -> None:
    """Move a finished temporary file to its final name (a rename locally, copy+delete on object stores)."""
    fs, tmp = get_fs(tmp_url, storage_options)
    _, final = get_fs(final_url, storage_options)
    fs.mv(tmp, final)


def stamp(url: str, storage_options: dict | None = None) -> tuple[int | None, str]:
    """A file as stored now: its size and modification stamp (mtime locally, the ETag on object stores)."""
    fs, path = get_fs(url, storage_options)
    info = fs.info(path)
    mark = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return info.get("size"), str(mark)


def move_tree(src_url: str, dst_url: str, storage_options: dict | None = None) -> None:
    """Move a directory (a rename locally; each object copied then deleted on object stores, which have no dirs)."""
    fs, src = get_fs(src_url, storage_options)
    _, dst = get_fs(dst_url, storage_options)
    if is_local(src_url):
        fs.mv(src, dst, recursive=True)
        return
    src = src.rstrip("/")
    for path in fs.find(src):
        fs.mv(path, dst.rstrip("/") + path[len(src) :])


def remove(url: str, storage_options: dict | None = None) -> None:
    """Delete a file if it exists."""
    fs, path = get_fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path)


def listdir(url: str, storage_options: dict | None = None) -> list[str]:
    """Base names of the entries of a directory (empty if it does not exist)."""
    fs, path = get_fs(url, storage_options)
    try:
        entries = fs.ls(path, detail=False, refresh=True)  # object stores cache listings; refresh sees new shards
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


# ---------------------------------------------------------------- local spools of object-store writers


def open_spool() -> tuple[str, int]:
    """A new local directory for an object-store writer's files, and the descriptor of its lock (held until
    :func:`close_spool`); killed writers' spools are removed first."""
    remove_dead_spools()
    path = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")
    # held while the spool lives: a cleaner that can take the lock knows its writer is gone, whatever pid
    # namespace either runs in (the kernel drops the lock when the writer dies)
    fd = os.open(os.path.join(path, SPOOL_LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, fd


def close_spool(path: str, lock_fd: int) -> None:
    """Remove a spool made by :func:`open_spool` and release its lock (once; later calls do nothing)."""
    if os.path.isdir(path):
        for f in os.listdir(path):
            os.remove(os.path.join(path, f))
        os.rmdir(path)
        os.close(lock_fd)


def _spool_abandoned(path: str) -> bool:
    """Whether a spool's writer is gone: its lock can be taken (a live writer holds it until it is done)."""
    try:
        fd = os.open(os.path.join(path, SPOOL_LOCK), os.O_RDWR)
    except FileNotFoundError:  # being created (the lock comes right after the folder), or already removed
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def remove_dead_spools(tmp_root: str | None = None) -> int:
    """Remove the local spool directories of object-store writers that are gone (killed mid-shard); returns how
    many. A live writer holds its spool's lock, so its spool stays, in this pid namespace or another."""
    root = tmp_root or tempfile.gettempdir()
    n = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        path = os.path.join(root, name)
        if re.fullmatch(re.escape(SPOOL_PREFIX) + r"\d+-\w+", name) and _spool_abandoned(path):
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n
