"""A shard's image/text pairs decoded for the CLIP scorer, in persistent DataLoader workers.

Each worker decodes every n-th sample of the shard and collates its chunk into one image tensor, so the model is fed
while the workers decode. One loader per process serves shard after shard: its workers start once, a dead one is
found before the next pass, and any failed pass drops the loader so the retry starts fresh. A remote shard is fetched
once into a local temporary file for all the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import multiprocessing
import os
import pickle
import re
import tarfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageOps
from torch.utils.data._utils import signal_handling as _signals

from pipeline import storage
from pipeline.images import to_rgb
from pipeline.shards import first_image, iter_samples

if TYPE_CHECKING:
    from pipeline.curate.scorer import ClipScorer


class ShardPairs(torch.utils.data.IterableDataset):
    """The pairs of one tar shard, decoded and transformed in DataLoader workers (sample i -> worker i % n).

    The shard to read is set with ``set_shard`` before each pass. It lives in shared memory, so one DataLoader with
    persistent workers serves shard after shard: the workers start once per process, not once per shard.
    """

    JOB_BYTES = 1 << 16  # the pickled (url, storage options) of the current shard

    def __init__(self, transform, url: str | None = None, storage_options: dict | None = None):
        self.transform = transform
        self._job = multiprocessing.RawArray("c", self.JOB_BYTES)
        if url is not None:
            self.set_shard(url, storage_options)

    def set_shard(self, url: str, storage_options: dict | None = None) -> None:
        """Point the next pass (the next ``iter`` of a loader over this dataset) at ``url``."""
        data = pickle.dumps((url, storage_options))
        if len(data) + 4 > self.JOB_BYTES:
            raise ValueError(f"{url}: the storage options are too large to hand to the decode workers")
        self._job[4 : 4 + len(data)] = data
        self._job[:4] = len(data).to_bytes(4, "little")

    def shard(self) -> tuple[str, dict | None]:
        """The shard the next pass reads, and its storage options."""
        size = int.from_bytes(self._job[:4], "little")
        return pickle.loads(self._job[4 : 4 + size])

    def __iter__(self):
        url, storage_options = self.shard()
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        try:
            for i, sample in enumerate(iter_samples(url, storage_options, decode=False)):
                if i % n != wid:
                    continue
                yield i, *decode_pair(sample, self.transform)
        except (tarfile.TarError, EOFError, OSError) as e:  # index -1: score_pairs raises it with the URL
            yield -1, None, None, "", {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


INT_META = ("width", "height", "original_width", "original_height")  # px
STR_META = ("url", "page_url", "sha256")
_PHASH = re.compile(r"[0-9a-fA-F]{16}")


def _int_or_none(v) -> int | None:
    if isinstance(v, str):
        v = v.strip()
        return int(v) if re.fullmatch(r"[0-9]+", v) else None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v != int(v):
        return None
    return int(v)


def clean_meta(meta: dict) -> dict:
    """The stored metadata fields with the types the score table needs: sizes int or None, strings or None, a
    phash of 16 hex digits or None (a bad value in one sample must not fail its shard)."""
    out = {f: _int_or_none(meta.get(f)) for f in INT_META}
    out.update({f: meta[f] if isinstance(meta.get(f), str) else None for f in STR_META})
    if out["sha256"]:  # another tool's upper-case hex matches ours
        out["sha256"] = out["sha256"].strip().lower() or None
    ph = meta.get("phash")
    out["phash"] = ph.lower() if isinstance(ph, str) and _PHASH.fullmatch(ph) else None
    return out


def _fill_image_meta(meta: dict, data: bytes, im: Image.Image) -> dict:
    """Fill what the metadata lacks from the decoded image: sha256 of its bytes, its size, its perceptual hash."""
    from pipeline.images import phash

    if meta["sha256"] is None:
        meta["sha256"] = hashlib.sha256(data).hexdigest()
    if meta["width"] is None or meta["height"] is None:
        meta["width"], meta["height"] = im.size
    if meta["phash"] is None:
        meta["phash"] = phash(im)
    return meta


def decode_pair(sample: dict, transform) -> tuple[str, torch.Tensor | None, str, dict, str | None]:
    """Raw sample -> (key, image tensor or None, caption, cleaned metadata, error)."""
    import json

    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else ""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        return sample["__key__"], None, caption, clean_meta({}), f"bad json metadata: {e}"[:200]
    if not isinstance(meta, dict):
        why = f"bad json metadata: a {type(meta).__name__}, not an object"
        return sample["__key__"], None, caption, clean_meta({}), why
    meta = clean_meta(meta)
    data = first_image(sample)
    if data is None:
        return sample["__key__"], None, caption, meta, "no image field"
    try:
        with Image.open(io.BytesIO(data)) as im:  # upright, alpha on white, 16-bit grey scaled: as the scraper does
            rgb = to_rgb(ImageOps.exif_transpose(im), (255, 255, 255))
            return sample["__key__"], transform(rgb), caption, _fill_image_meta(meta, data, rgb), None
    except Exception as e:  # any undecodable image is one dropped sample, never a failed shard
        return sample["__key__"], None, caption, meta, f"{type(e).__name__}: {e}"[:200]


@dataclass
class PairBatch:
    """Decoded pairs, collated in the worker: one tensor of the images travels (and is pinned) per batch."""

    items: list  # (index, key, has_image, caption, meta, error) per pair, in the worker's order
    images: torch.Tensor | None  # (k, 3, H, W): the images of the items with has_image, in order

    def pin_memory(self) -> PairBatch:
        return PairBatch(self.items, None if self.images is None else self.images.pin_memory())


def _collate(items: list) -> PairBatch:
    images = [it[2] for it in items if it[2] is not None]
    rows = [(i, key, image is not None, caption, meta, error) for i, key, image, caption, meta, error in items]
    return PairBatch(rows, torch.stack(images) if images else None)


@dataclass
class _PairLoader:
    scorer: ClipScorer
    batch_size: int
    workers: int
    dataset: ShardPairs
    loader: torch.utils.data.DataLoader


_PAIR_LOADER: list[_PairLoader] = []  # this process's loader with persistent decode workers (at most one)
_PAIR_LOCK = threading.Lock()  # held by the pass using it: a concurrent pass in another thread gets its own loader


def chunk_size(batch_size: int, workers: int) -> int:
    """Pairs per worker batch: about a model batch shared out over the workers, so the model is fed while they
    decode rather than after each has decoded a whole batch (``batch_size`` itself when decoding inline)."""
    return batch_size if workers == 0 else max(8, -(-batch_size // workers))


def pair_loader(scorer: ClipScorer, batch_size: int, workers: int) -> tuple[ShardPairs, torch.utils.data.DataLoader]:
    """This process's DataLoader over ``ShardPairs`` with ``workers`` persistent decode workers (``workers`` > 0).

    Starting the workers costs about 0.1 s each; per shard that was most of a GPU run's time on small shards.
    The workers stay up for every later shard scored with the same scorer and settings, and exit with the
    process (or when the settings change).
    """
    for entry in _PAIR_LOADER:
        same = entry.scorer is scorer and (entry.batch_size, entry.workers) == (batch_size, workers)
        if same and _workers_alive(entry.loader):
            return entry.dataset, entry.loader
    _drop_loaders()  # other settings, or a dead worker: the old loader's workers end
    dataset = ShardPairs(scorer.transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=chunk_size(batch_size, workers),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=scorer.device.type == "cuda",
        prefetch_factor=8,
        persistent_workers=True,
    )
    _PAIR_LOADER.append(_PairLoader(scorer, batch_size, workers, dataset, loader))
    return dataset, loader


def _workers_alive(loader: torch.utils.data.DataLoader) -> bool:
    """Whether every persistent worker of ``loader`` still runs (true before its first pass). A worker killed
    between passes (the out-of-memory killer, say) would fail every later pass of the cached loader."""
    it = loader._iterator  # private, but the only handle on the worker processes
    return it is None or all(w.is_alive() for w in getattr(it, "_workers", ()))


def _watch_workers(loader: torch.utils.data.DataLoader, on: bool) -> None:
    """Register (``on``) or unregister the persistent workers' ids with torch's SIGCHLD handler.

    Registered, a worker's death raises ``RuntimeError`` in this process's main thread wherever it is, and on
    every later child exit while the dead id stays registered. That is the fast way to notice a death during a
    pass; between passes it would fail unrelated work (writing a shard's parquet, another task, a process pool's
    queue), so the ids are registered only while a pass runs and a dead worker is found by ``_workers_alive``.
    """
    it = loader._iterator
    if it is None or getattr(it, "_worker_pids_set", on) == on:
        return
    if on:
        _signals._set_worker_pids(id(it), tuple(w.pid for w in it._workers))
    else:
        _signals._remove_worker_pids(id(it))
    it._worker_pids_set = on


def _drop_loaders() -> None:
    """Shut this process's persistent loader down now (its workers end; a dead one's id is unregistered first, so
    the others' exits raise nothing), so the next pass starts fresh workers."""
    for entry in _PAIR_LOADER:
        if entry.loader._iterator is not None:
            _watch_workers(entry.loader, False)
            entry.loader._iterator._shutdown_workers()
    _PAIR_LOADER.clear()


@contextlib.contextmanager
def _read_once(url: str, storage_options: dict | None, workers: int):
    """``(url, storage_options)`` for the decode workers to read: a remote shard that two or more workers would
    each download whole (each keeps every n-th sample) is fetched once into a local temporary file instead."""
    if workers < 2 or storage.is_local(url):
        yield url, storage_options
        return
    import shutil
    import tempfile

    import fsspec

    fd, path = tempfile.mkstemp(prefix="altforge-shard-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as out, fsspec.open(url, "rb", **(storage_options or {})) as f:
            shutil.copyfileobj(f, out, 1 << 22)
        yield path, None
    finally:
        os.unlink(path)


def pair_batches(url: str, scorer: ClipScorer, batch_size: int, workers: int, storage_options: dict | None = None):
    """Yield the decoded pairs of one shard as ``PairBatch`` objects of ``chunk_size`` pairs or fewer."""
    with contextlib.ExitStack() as stack:
        read_url, read_options = stack.enter_context(_read_once(url, storage_options, workers))
        chunks = stack.enter_context(
            contextlib.closing(_pair_batches(read_url, scorer, batch_size, workers, read_options))
        )
        for chunk in chunks:
            if read_url != url:  # a read error names the shard, not the temporary copy
                chunk.items = [it if it[0] >= 0 else (*it[:5], it[5].replace(read_url, url)) for it in chunk.items]
            yield chunk


def _pair_batches(url: str, scorer: ClipScorer, batch_size: int, workers: int, storage_options: dict | None):
    if workers > 0 and _PAIR_LOCK.acquire(blocking=False):
        try:
            dataset, loader = pair_loader(scorer, batch_size, workers)
            dataset.set_shard(url, storage_options)  # before iter(loader): the workers read it as the pass begins
            _watch_workers(loader, True)
            try:
                yield from loader
            except GeneratorExit:  # the consumer stopped early: the workers are fine, the next pass resets them
                raise
            except BaseException:  # a worker died or failed, or Ctrl-C cut the workers' reset short (its unread
                _drop_loaders()  # acknowledgements would confuse the next pass): the next pass starts anew
                raise
            finally:
                _watch_workers(loader, False)
        finally:
            _PAIR_LOCK.release()
        return
    # inline decoding, or another pass of this process (a second task thread) holds the persistent loader
    loader = torch.utils.data.DataLoader(
        ShardPairs(scorer.transform, url, storage_options),
        batch_size=chunk_size(batch_size, workers),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=scorer.device.type == "cuda" and workers > 0,
        prefetch_factor=8 if workers else None,
    )
    yield from loader


def model_batches(url: str, scorer: ClipScorer, batch_size: int, workers: int, storage_options: dict | None = None):
    """The workers' chunks of one shard gathered into model batches: yields ``(items, images)`` with at least
    ``batch_size`` decoded images (fewer at the end), each chunk's images sent to the device as it arrives."""
    items, images, count = [], [], 0
    with contextlib.closing(pair_batches(url, scorer, batch_size, workers, storage_options)) as chunks:
        for chunk in chunks:
            items += chunk.items
            if chunk.images is not None:
                images.append(chunk.images.to(scorer.device, non_blocking=True))
                count += len(chunk.images)
            if count >= batch_size:
                yield items, torch.cat(images)
                items, images, count = [], [], 0
    if items:
        yield items, torch.cat(images) if images else None
