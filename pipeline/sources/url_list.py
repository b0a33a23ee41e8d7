"""Image records from URL lists (img2dataset's input formats and options) and Hugging Face datasets, streamed.

Formats (img2dataset's names): ``txt`` (one URL a line), ``csv`` and ``tsv`` (with a header row), ``json`` (an
array of objects, or pandas' column layout), ``jsonl`` (one object a line) and ``parquet``; all but parquet may
be gzipped (``tsv.gz``, ``jsonl.gz``, ... or a ``.gz`` file name). A directory stands for its ``*.<format>``
files in name order. Nothing is loaded whole except pandas' column-layout JSON, which cannot be streamed.

Counted in ``drops``: ``bad_url`` (missing, empty or not http(s)), ``bad_row`` (an unreadable line or row, JSON
nested too deeply to decode, or a malformed element of a JSON array, after which reading goes on at the next
element), ``truncated_list`` (a gzipped list that ends early: the rows read so far are kept) and ``corrupt_list``
(a gzipped list whose data is damaged: likewise). A missing or empty caption gives ``caption=None``; it is not a
drop. Bytes that are not UTF-8 are read as windows-1252 (a list exported by a legacy tool), not replaced.

Columns: a column that is not in the file is an error raised before the first record. JSON and JSONL have no
header: the url column must be in the first object, and every other named column in at least one of the first
``HEADER_ROWS`` objects (a row may leave out a caption it does not have).

TSV has no quoting convention, so each line is one row: a line written with CSV quoting (``csv.writer``,
pandas' ``to_csv(sep="\t")``) is unquoted, any other line is split at its tabs as it is (a caption that opens
with ``"`` keeps it). A CSV field may be quoted across lines.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import itertools
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.sources.html import clean_text
from pipeline.sources.records import Record, guarded_options, partition, refusals_as_errors

__all__ = ["FORMATS", "infer_format", "iter_hf_dataset", "iter_url_list", "partition"]

FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")  # each but parquet also as "<format>.gz"
BATCH_ROWS = 10_000  # parquet rows decoded at a time
PARQUET_BUFFER_BYTES = 1 << 20  # bytes read ahead per parquet column stream
HEADER_ROWS = 1000  # JSON/JSONL objects whose keys stand for a header
JSON_CHUNK_CHARS = 1 << 20  # characters read at a time from a JSON array
JSON_MAX_ELEMENT_CHARS = 1 << 22  # a JSON array element still unparsed after this many characters is malformed
_JSON_NEXT_OBJECT = re.compile(r"\}\s*,\s*\{")  # where reading resumes after a malformed array element
_JSON_SEPARATORS = " \t\r\n,"


def infer_format(path: str) -> str:
    """The input format named by a file name: ``x.tsv.gz`` -> ``"tsv.gz"``, ``x.parquet`` -> ``"parquet"``."""
    name = os.path.basename(str(path).rstrip("/")).lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    ext = stem.rsplit(".", 1)[-1] if "." in stem else ""
    ext = {"ndjson": "jsonl", "text": "txt"}.get(ext, ext)
    if ext not in FORMATS or (gz and ext == "parquet"):
        raise ValueError(f"cannot infer the input format of {path!r}: give input_format, one of {FORMATS}")
    return ext + (".gz" if gz else "")


def _split_format(input_format: str) -> tuple[str, bool]:
    base, gz = (input_format[:-3], True) if input_format.endswith(".gz") else (input_format, False)
    if base not in FORMATS or (gz and base == "parquet"):
        raise ValueError(f"unknown input_format {input_format!r}: one of {FORMATS}, optionally with .gz")
    return base, gz


def _record(url: Any, caption: Any, extra: tuple, drops: Counter) -> Record | None:
    """A record from one row's values, or None with ``bad_url`` counted."""
    url = url.strip() if isinstance(url, str) else ("" if url is None else str(url).strip())
    if not url.lower().startswith(("http://", "https://")) or len(url) < 10:
        drops["bad_url"] += 1
        return None
    if caption is not None and not isinstance(caption, str):
        caption = None if caption != caption else str(caption)  # NaN -> None
    cleaned = clean_text(caption) if caption else ""
    return Record(url=url, caption=cleaned or None, alt_raw=caption, extra=extra)


def _check_columns(available: Iterable[str], wanted: list[str], path: str) -> None:
    missing = [c for c in wanted if c not in set(available)]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} not found (columns: {sorted(available)})")


def _wanted(url_col: str, caption_col: str | None, extra_cols: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([url_col] + ([caption_col] if caption_col else []) + list(extra_cols)))


def _header_checked(rows: Iterable[Any], wanted: list[str], path: str) -> Iterator[Any]:
    """``rows`` (JSON values), after checking the columns as a header would be checked, before the first row is
    passed on: the url column must be in the first object, and every other wanted column in at least one of the
    first ``HEADER_ROWS`` objects (a caption may be left out of a row that has none)."""
    rows = iter(rows)
    head = list(itertools.islice(rows, HEADER_ROWS))
    objects = [r for r in head if isinstance(r, dict)]
    if objects:
        keys = set().union(*objects)
        _check_columns(objects[0], wanted[:1], path)
        _check_columns(keys, wanted, path)
    yield from head
    yield from rows


def _rows_from_dicts(rows: Iterable[Any], url_col, caption_col, extra_cols, drops: Counter) -> Iterator[Record]:
    for row in rows:
        if not isinstance(row, dict):
            drops["bad_row"] += 1
            continue
        extra = tuple((c, row.get(c)) for c in extra_cols)
        rec = _record(row.get(url_col), row.get(caption_col) if caption_col else None, extra, drops)
        if rec is not None:
            yield rec


def _read_txt(path: str, gz: bool, opts: dict, drops: Counter) -> Iterator[Record]:
    with _open_text(path, gz, opts) as fh:
        for line in fh:
            rec = _record(line, None, (), drops)
            if rec is not None:
                yield rec


def _cell(row: list[str], i: int | None) -> str | None:
    return row[i] if i is not None and i < len(row) else None


def _cp1252_fallback(e: UnicodeDecodeError) -> tuple[str, int]:
    """Codec error handler: bytes that are not UTF-8 decode as windows-1252 (undefined ones as U+FFFD)."""
    return e.object[e.start : e.end].decode("cp1252", errors="replace"), e.end


codecs.register_error("altforge-cp1252", _cp1252_fallback)


def _open_text(path: str, gz: bool, opts: dict, newline: str | None = None):
    """Open a (possibly gzipped) UTF-8 text file through fsspec; a BOM is dropped, bytes that are not UTF-8 are
    read as windows-1252."""
    compression = "gzip" if gz else "infer"
    return fsspec.open(
        path, "rt", compression=compression, encoding="utf-8-sig", errors="altforge-cp1252", newline=newline, **opts
    )


def _tsv_row(line: str) -> list[str]:
    """One TSV line's fields: CSV-unquoted if the line parses so, else split at its tabs (csv.Error if too long)."""
    line = line.rstrip("\r\n")
    if '"' in line:
        try:
            return next(csv.reader([line], delimiter="\t", strict=True), [])
        except csv.Error:  # an unmatched or stray quote: literal text, not a field going on over the next lines
            pass
    row = line.split("\t") if line else []
    if any(len(f) > csv.field_size_limit() for f in row):
        raise csv.Error("field larger than field limit")
    return row


def _read_csv(path, gz, delimiter, url_col, caption_col, extra_cols, opts, drops) -> Iterator[Record]:
    with _open_text(path, gz, opts, newline="") as fh:
        reader = map(_tsv_row, fh) if delimiter == "\t" else csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        _check_columns(header, _wanted(url_col, caption_col, extra_cols), path)
        iu = header.index(url_col)
        ic = header.index(caption_col) if caption_col else None
        ix = [(c, header.index(c)) for c in extra_cols]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:  # e.g. a field over csv.field_size_limit()
                drops["bad_row"] += 1
                continue
            if not row:
                continue  # a blank line is no row
            rec = _record(_cell(row, iu), _cell(row, ic), tuple((c, _cell(row, i)) for c, i in ix), drops)
            if rec is not None:
                yield rec


def _read_jsonl(path, gz, url_col, caption_col, extra_cols, opts, drops) -> Iterator[Record]:
    def rows(fh):
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter's limit
                drops["bad_row"] += 1

    with _open_text(path, gz, opts) as fh:
        checked = _header_checked(rows(fh), _wanted(url_col, caption_col, extra_cols), path)
        yield from _rows_from_dicts(checked, url_col, caption_col, extra_cols, drops)


def _json_values(fh, drops: Counter) -> Iterator[Any]:
    """The elements of a top-level JSON array (or of concatenated JSON values), decoded incrementally.

    An element that does not parse (malformed, or nested too deeply) is one ``bad_row``; reading resumes at the next
    object of the array (after the next ``}, {``), so one bad element costs its own row, not the rest of the file,
    and an element never holds more than ``JSON_MAX_ELEMENT_CHARS`` in memory.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof, opened = "", 0, False, False

    def more() -> None:
        nonlocal buf, pos, eof
        chunk = fh.read(JSON_CHUNK_CHARS)
        buf, pos, eof = buf[pos:] + chunk, 0, not chunk

    while True:
        while pos < len(buf) and buf[pos] in _JSON_SEPARATORS:
            pos += 1
        if pos == len(buf):
            if eof:
                return
            more()
            continue
        if buf[pos] == "[" and not opened:
            opened, pos = True, pos + 1
            continue
        if buf[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(buf, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            at_end = isinstance(e, json.JSONDecodeError) and (
                # it ran into the chunk's end: within a literal or \uXXXX escape of it (a cut "tru" fails where
                # it starts), or inside a string (which fails where the string starts)
                e.pos >= len(buf) - 16 or e.msg.startswith("Unterminated string")
            )
            if at_end and not eof and len(buf) - pos < JSON_MAX_ELEMENT_CHARS:
                more()  # an element cut by the chunk boundary, most likely
                continue
            drops["bad_row"] += 1
            while (m := _JSON_NEXT_OBJECT.search(buf, pos + 1)) is None:  # resynchronise at the next object
                if eof:
                    return
                keep = min(len(buf) - pos, 64)  # a "}, {" that straddles the chunks
                pos = len(buf) - keep
                more()
            pos = m.end() - 1
            continue
        pos = end
        yield value


def _read_json(path, gz, url_col, caption_col, extra_cols, opts, drops) -> Iterator[Record]:
    with _open_text(path, gz, opts) as fh:
        values = _json_values(fh, drops)
        first = next(values, None)
        if first is None:
            return
        if isinstance(first, dict) and isinstance(first.get(url_col), dict | list):
            # pandas' default DataFrame.to_json layout: {"url": {"0": ..., "1": ...}, "caption": {...}}
            _check_columns(first, _wanted(url_col, caption_col, extra_cols), path)
            columns = {k: list(v.values()) if isinstance(v, dict) else list(v) for k, v in first.items()}
            n = len(columns[url_col])
            rows: Iterable[Any] = ({k: v[i] for k, v in columns.items() if i < len(v)} for i in range(n))
        else:
            rows = _header_checked(_chain_first(first, values), _wanted(url_col, caption_col, extra_cols), path)
        yield from _rows_from_dicts(rows, url_col, caption_col, extra_cols, drops)


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _read_parquet(path, url_col, caption_col, extra_cols, opts, drops) -> Iterator[Record]:
    with fsspec.open(path, "rb", **opts) as fh:
        pf = pq.ParquetFile(fh, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)  # read column chunks as a stream
        wanted = _wanted(url_col, caption_col, extra_cols)
        _check_columns(pf.schema_arrow.names, wanted, path)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted, use_threads=False):
            cols = {name: batch.column(name).to_pylist() for name in wanted}
            urls = cols[url_col]
            captions = cols[caption_col] if caption_col else [None] * len(urls)
            for i, url in enumerate(urls):
                rec = _record(url, captions[i], tuple((c, cols[c][i]) for c in extra_cols), drops)
                if rec is not None:
                    yield rec


def _files(path: str, input_format: str, opts: dict) -> list[str]:
    """``path`` itself, or the ``*.<input_format>`` files of a directory in name order (as img2dataset does)."""
    fs, fs_path = fsspec.core.url_to_fs(path, **opts)
    if not fs.isdir(fs_path):
        return [path]
    files = sorted(fs.glob(fs_path.rstrip("/") + "/*." + input_format))
    if not files:
        raise ValueError(f"no *.{input_format} file in directory {path}")
    return [fs.unstrip_protocol(f) for f in files]


def iter_url_list(
    path: str,
    *,
    input_format: str | None = None,
    url_col: str = "url",
    caption_col: str | None = "caption",
    extra_cols: Iterable[str] = (),
    drops: Counter,
    storage_options: dict | None = None,
    allow_private: bool = False,
) -> Iterator[Record]:
    """Stream the records of a URL list file or directory (img2dataset's ``input_format`` / column options).

    ``extra_cols`` is img2dataset's ``save_additional_columns``: carried into ``Record.extra`` as (name, value).
    ``caption_col=None`` reads no caption; a ``txt`` list never has one. ``input_format`` defaults to the
    file's extension. A column that is not in the file is an error, raised before the first record. An http(s)
    list is read under the fetcher's address rules (``allow_private`` as ``--allow-private-network``).
    """
    opts = guarded_options(path, storage_options, allow_private)
    input_format = input_format or infer_format(path)
    with refusals_as_errors(path):
        yield from _read_files(path, input_format, url_col, caption_col, tuple(extra_cols), drops, opts)


def _read_files(path, input_format, url_col, caption_col, extra_cols, drops, opts) -> Iterator[Record]:
    base, gz = _split_format(input_format)
    for file in _files(path, input_format, opts):
        if base == "txt":
            rows = _read_txt(file, gz, opts, drops)
        elif base in ("csv", "tsv"):
            delimiter = "," if base == "csv" else "\t"
            rows = _read_csv(file, gz, delimiter, url_col, caption_col, extra_cols, opts, drops)
        elif base == "jsonl":
            rows = _read_jsonl(file, gz, url_col, caption_col, extra_cols, opts, drops)
        elif base == "json":
            rows = _read_json(file, gz, url_col, caption_col, extra_cols, opts, drops)
        else:
            rows = _read_parquet(file, url_col, caption_col, extra_cols, opts, drops)
        try:
            yield from rows
        except gzip.BadGzipFile as e:  # not gzip at all: a wrong name or input_format, not a damaged list
            raise ValueError(f"{file}: {e} (is input_format {input_format!r} right?)") from None
        except EOFError:  # the rows before the cut are kept; the next file is read
            drops["truncated_list"] += 1
        except zlib.error:
            drops["corrupt_list"] += 1


def _is_saved_dataset(path: str) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")
    )


def iter_hf_dataset(
    name_or_path: str,
    *,
    split: str = "train",
    url_col: str = "url",
    caption_col: str | None = "caption",
    extra_cols: Iterable[str] = (),
    drops: Counter,
    data_files: str | list[str] | dict | None = None,
) -> Iterator[Record]:
    """Stream the records of a Hugging Face dataset: a hub id, a local data folder, or a ``save_to_disk`` folder.

    Streams through ``datasets.load_dataset(..., streaming=True)``; a local folder needs no network (run with
    ``HF_HUB_OFFLINE=1`` to be sure). Only the named columns are read.
    """
    import datasets  # heavy; only this function needs it

    extra_cols = tuple(extra_cols)
    wanted = _wanted(url_col, caption_col, extra_cols)
    if _is_saved_dataset(name_or_path):
        ds = datasets.load_from_disk(name_or_path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        ds = ds.to_iterable_dataset()
    else:
        ds = datasets.load_dataset(name_or_path, split=split, streaming=True, data_files=data_files)
    if ds.column_names is not None:
        _check_columns(ds.column_names, wanted, name_or_path)
        ds = ds.select_columns(wanted)
        yield from _rows_from_dicts(ds, url_col, caption_col, extra_cols, drops)
    else:  # a streamed dataset whose features are unknown until read: its first rows stand for the header
        yield from _rows_from_dicts(_header_checked(ds, wanted, name_or_path), url_col, caption_col, extra_cols, drops)
