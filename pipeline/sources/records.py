"""The image record every source yields, its stable key, cross-page dedup and fixed-size partitions."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice


def record_key(url: str, caption: str | None) -> str:
    """Stable sample key: the first 16 hex digits of sha1(url + TAB + caption), the same on every rerun."""
    return hashlib.sha1(f"{url}\t{caption or ''}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Record:
    """One image to download: its absolute URL, its caption and where it was found."""

    url: str  # absolute http(s) image URL
    caption: str | None  # cleaned alt text; None for URL lists without captions
    page_url: str | None = None  # the page the image was found on (None for URL lists)
    alt_raw: str | None = None  # the alt text as found (entities decoded), before cleaning
    extra: tuple = ()  # (name, value) pairs carried from URL lists (img2dataset's save_additional_columns)

    @property
    def key(self) -> str:
        """This record's stable key (see :func:`record_key`)."""
        return record_key(self.url, self.caption)


@dataclass
class SeenPairs:
    """Remembers (url, caption) pairs across pages, so the crawler keeps each pair once."""

    seen: set = field(default_factory=set)  # 64-bit hashes of (url, caption); process-local

    def first_time(self, url: str, caption: str | None) -> bool:
        """True the first time the pair is offered, False afterwards."""
        h = hash((url, caption))
        if h in self.seen:
            return False
        self.seen.add(h)
        return True


def partition(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Cut a record stream into lists of ``size`` records (the last may be shorter); one list per output shard."""
    if size < 1:
        raise ValueError(f"partition size must be >= 1, not {size}")
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def guarded_options(path: str, storage_options: dict | None, allow_private: bool) -> dict:
    """fsspec options to read the input file ``path`` under the fetcher's address rules; one-line ValueError when
    an http(s) ``path`` is refused (see :func:`pipeline.netguard.input_options`)."""
    from pipeline.netguard import RefusedURL, input_options

    try:
        return input_options(path, storage_options, allow_private)
    except RefusedURL as exc:
        raise ValueError(f"input {path[:200]} refused ({exc.reason}): {exc.message}") from None


@contextmanager
def refusals_as_errors(path: str) -> Iterator[None]:
    """Turn a refused redirect hop or address met while reading the input ``path`` (fsspec may wrap it) into a
    one-line ValueError."""
    from pipeline.netguard import AddressRefused, RefusedURL

    try:
        yield
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, RefusedURL | AddressRefused):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        reason = getattr(cause, "reason", "refused_address")
        raise ValueError(f"input {path[:200]}: redirect refused ({reason}): {cause}") from None
