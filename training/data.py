"""Streaming shard loader: seeded shard shuffle before the rank/worker split, equal full batches, exact resume.

The stream is a chain of plain generators (the webdataset idea: shards -> samples -> shuffle -> map -> batch).
Every rank runs ``workers`` DataLoader workers; each (rank, worker) pair is a *slot*. For each epoch the shard
list is permuted with ``seed`` and ``epoch`` and only then dealt to the slots, so no rank is stuck on one subset.
With fewer shards than slots (or ``split="sample"``) every slot reads the permuted shards and keeps every S-th
sample instead; then a global batch holds the same samples whatever the world size.

Each slot yields exactly ``batches_per_slot`` full batches per epoch, so every rank takes the same number of steps
and DDP never hangs. An epoch of a slot is one pass over its share that the shuffle buffer drains, so no sample
comes twice; a slot whose share is short of its batches (unequal shards, bad samples) wraps only after that pass,
and the samples past a slot's last full batch sit this epoch out. Each batch carries the slot's position
(epoch, raw samples consumed, batches emitted), so the trainer can save where every slot stands and a resumed
run skips exactly what was consumed (raw samples are skipped before decoding, so resuming is cheap). A slot keeps
the undecoded samples of the shards it has read whole in memory, up to ``LoaderConfig.cache_mb``, and replays them
(faults included) in later epochs, so a small dataset is read and parsed once (:class:`SampleCache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pipeline import storage
from pipeline.shards import iter_samples, shard_urls
from pipeline.stats import error_line  # noqa: F401  (the trainers' one-line errors, re-exported)

log = logging.getLogger(__name__)

# map_fn(raw_sample, rng) -> dict of arrays/tensors; raise KeyError / ValueError / OSError for a bad sample
MapFn = Callable[[dict, random.Random], dict]


SPLITS = ("shard", "sample")  # how shards are shared out over ranks and workers (LoaderConfig.split)


@dataclass(frozen=True)
class LoaderConfig:
    """How shards become batches on one rank."""

    batch_size: int = 64  # samples per rank per step
    workers: int = 2  # DataLoader worker processes per rank; 0 = load in the main process
    seed: int = 0  # shard permutation, shuffle buffers and augmentation all derive from it
    shuffle_buffer: int = 1000  # samples held per slot for sample-level shuffling; 0 = none
    split: str = "shard"  # "shard": slots read disjoint shards; "sample": every slot strides over all samples
    prefetch_factor: int = 2  # batches each worker keeps ready
    pin_memory: bool = True  # only takes effect when CUDA is available
    cache_mb: int = 256  # undecoded samples each loading process keeps in memory for later epochs; 0 = none

    def __post_init__(self):
        if self.batch_size < 1 or self.workers < 0 or self.shuffle_buffer < 0 or self.cache_mb < 0:
            raise ValueError("batch_size must be >= 1, workers, shuffle_buffer and cache_mb >= 0")
        if self.split not in SPLITS:
            raise ValueError(f"split must be 'shard' or 'sample', got {self.split!r}")

    @classmethod
    def of(cls, trainer_cfg) -> LoaderConfig:
        """The loader settings of a trainer's config (the fields of the same names)."""
        c = trainer_cfg
        return cls(c.batch_size, c.workers, c.seed, c.shuffle_buffer, c.split, cache_mb=c.cache_mb)


@dataclass(frozen=True)
class ShardPlan:
    """The shards of a dataset and the per-epoch deal of them to the slots of ``world_size`` ranks."""

    urls: tuple[str, ...]  # sorted shard URLs
    sizes: tuple[int, ...]  # samples per shard (from sizes.json)
    world_size: int
    workers: int  # per rank (0 counts as 1 slot)
    batch_size: int  # per rank
    seed: int
    split: str
    storage_options: dict | None = field(default=None, compare=False)  # fsspec options (s3 endpoint, ...)

    @property
    def slots(self) -> int:
        """Number of (rank, worker) slots."""
        return self.world_size * max(1, self.workers)

    @property
    def samples(self) -> int:
        """Samples in the dataset, from sizes.json."""
        return sum(self.sizes)

    @property
    def batches_per_slot(self) -> int:
        """Full batches every slot yields per epoch (at least 1)."""
        return max(1, self.samples // (self.slots * self.batch_size))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer micro-steps (batches per rank) in one epoch."""
        return self.batches_per_slot * max(1, self.workers)

    def slot_shards(self, slot: int, epoch: int) -> tuple[list[str], int, int]:
        """(shard URLs in read order, sample stride, sample offset) of ``slot`` in ``epoch``."""
        order = list(self.urls)
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)  # shuffle first, then deal out
        if self.split == "shard" and len(order) >= self.slots:
            return order[slot :: self.slots], 1, 0
        return order, self.slots, slot


def read_sizes(source: str, storage_options: dict | None = None) -> tuple[list[str], list[int]]:
    """Shard URLs of ``source`` (sorted) and their sample counts from the ``sizes.json`` beside each of them.

    The shards of a dataset version (``pipeline.versions``) lie in several directories, each with its sizes.json.
    """
    urls = sorted(shard_urls(source, storage_options))
    if not urls:
        raise FileNotFoundError(f"no shards found in {source}")
    sizes: dict[str, dict] = {}  # directory -> its sizes.json
    for base in dict.fromkeys(u.rsplit("/", 1)[0] for u in urls):
        sizes_url = storage.join(base, "sizes.json")
        if not storage.exists(sizes_url, storage_options):
            raise FileNotFoundError(f"sizes.json not found beside the shards: {sizes_url}")
        sizes[base] = storage.read_json_object(sizes_url, storage_options)
        bad = [k for k, v in sizes[base].items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"{sizes_url}: not a count of samples for {bad[0]!r} ({sizes[base][bad[0]]!r})")
    split = [u.rsplit("/", 1) for u in urls]
    missing = [u for u, (base, name) in zip(urls, split, strict=True) if name not in sizes[base]]
    if missing:
        raise ValueError(f"sizes.json has no entry for {len(missing)} shard(s), e.g. {missing[0]}")
    return urls, [int(sizes[base][name]) for base, name in split]


def make_plan(source: str, cfg: LoaderConfig, world_size: int, storage_options: dict | None = None) -> ShardPlan:
    """The shard plan of a dataset directory, manifest or brace pattern for ``world_size`` ranks."""
    urls, sizes = read_sizes(source, storage_options)
    kept = [(u, n) for u, n in zip(urls, sizes, strict=True) if n > 0]  # an empty shard is dealt to no slot
    slots = world_size * max(1, cfg.workers)
    if sum(n for _, n in kept) < slots:
        raise ValueError(
            f"{source}: {sum(sizes)} sample(s) cannot feed {slots} loader slot(s) (ranks x workers): "
            "use fewer --workers or processes"
        )
    urls, sizes = (list(t) for t in zip(*kept, strict=True))
    return ShardPlan(
        tuple(urls), tuple(sizes), world_size, cfg.workers, cfg.batch_size, cfg.seed, cfg.split, storage_options
    )


def plan_fingerprint(plan: ShardPlan, cfg: LoaderConfig) -> str:
    """What decides a slot's sample stream besides ranks and workers: the shards (by name) and their sizes, batch,
    seed, split and shuffle buffer. A resume under another fingerprint cannot reuse the saved offsets."""
    doc = {
        "shards": [u.rsplit("/", 1)[-1] for u in plan.urls],  # names: a dataset moved elsewhere is the same stream
        "sizes": list(plan.sizes),
        "batch_size": plan.batch_size,
        "seed": plan.seed,
        "split": plan.split,
        "shuffle_buffer": cfg.shuffle_buffer,
    }
    if cfg.shuffle_buffer > 1:  # the buffer drains at each epoch's end (before, it never did: another stream)
        doc["buffer_drains"] = True
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- generators


class SampleCache:
    """A slot's undecoded samples, kept in memory after a shard's first whole read so that later epochs skip the
    storage reads and the tar parsing. A held shard replays exactly what reading it gave: its samples in order and
    its faults (``corrupt_shard``). Holds at most ``budget`` bytes; a shard that would pass it is read every time.
    """

    PER_FIELD = 128  # bytes of dict and object overhead counted per field, beside the payload

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.shards: dict[str, tuple[list[dict], Counter]] = {}

    def read(self, url: str, errors: Counter, storage_options=None) -> Iterator[dict]:
        """The samples of shard ``url`` as ``iter_samples(decode=False)`` yields them (copies, so a map that edits
        its sample leaves the held one alone); the shard's faults are added to ``errors`` where reading counts them.
        """
        if url in self.shards:
            samples, faults = self.shards[url]
            for sample in samples:
                yield dict(sample)
            errors.update(faults)
            return
        faults: Counter = Counter()
        samples: list[dict] | None = [] if self.used < self.budget else None
        size = 0
        for sample in iter_samples(url, storage_options, decode=False, errors=faults):
            if samples is not None:
                size += sum(len(v) + self.PER_FIELD for v in sample.values())
                if self.used + size > self.budget:
                    samples = None  # this shard does not fit: read it from storage each time
                else:
                    samples.append(sample)
                    sample = dict(sample)
            yield sample
        errors.update(faults)
        if samples is not None:  # read to its end (a consumer that stopped early never gets here)
            self.shards[url] = (samples, faults)
            self.used += size


def raw_samples(
    urls: list[str],
    stride: int,
    offset: int,
    errors: Counter,
    expected: dict | None = None,
    storage_options=None,
    cache: SampleCache | None = None,
) -> Iterator[dict]:
    """Undecoded samples of ``urls`` in order, every ``stride``-th from ``offset``: one pass (from ``cache`` for
    the shards it holds).

    A shard that yields fewer samples than ``expected[url]`` (sizes.json) adds the shortfall to
    ``errors["missing_from_shard"]``: a tar cut at a header boundary otherwise reads as a clean, shorter shard.
    """
    i = 0
    for url in urls:
        n_url = 0
        read = (
            cache.read(url, errors, storage_options)
            if cache is not None
            else iter_samples(url, storage_options, decode=False, errors=errors)
        )
        for sample in read:
            i += 1
            n_url += 1
            if (i - 1) % stride == offset:
                yield sample
        if expected and n_url < expected.get(url, 0):
            errors["missing_from_shard"] += expected[url] - n_url


def shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream with a buffer of ``size`` samples; deterministic given ``rng``. A finite stream drains."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        k = rng.randrange(size)
        buf[k], s = s, buf[k]
        yield s
    rng.shuffle(buf)
    yield from buf


def epoch_samples(
    plan: ShardPlan, slot: int, epoch: int, errors: Counter, shuffle_buffer: int, cache: SampleCache | None = None
) -> Iterator[dict]:
    """The undecoded samples of ``slot`` in ``epoch``: one shuffled pass over its share, drained to the end, then
    further passes (each shuffled and drained) only for as long as the caller still needs samples.

    A slot takes ``batches_per_slot`` full batches; one whose share falls short of that (unequal shards, bad
    samples) wraps, and only after every sample of its share came once, so an epoch repeats nothing it did not
    have to. When every shard of a slot turns out unreadable, the slot reads its share of all shards' samples
    instead, the same way on every run, so a resume replays it.
    """
    urls, stride, offset = plan.slot_shards(slot, epoch)
    fallback = (list(plan.urls), plan.slots, slot) if stride == 1 else None  # the slot's share of every shard
    sizes = dict(zip(plan.urls, plan.sizes, strict=True))
    rng = random.Random(f"buf-{plan.seed}-{epoch}-{slot}")
    first = True
    while True:
        got = 0
        # a shard's own faults (corrupt_shard, missing_from_shard) are counted once an epoch: by the slot that reads
        # from its first sample, in the first pass; the other slots and passes read the same shards again
        counts = errors if first and offset == 0 else Counter()
        one_pass = raw_samples(urls, stride, offset, counts, sizes, plan.storage_options, cache)
        first = False
        for sample in shuffled(one_pass, shuffle_buffer, rng):
            got += 1
            yield sample
        if got == 0 and fallback is not None:
            (urls, stride, offset), fallback = fallback, None
        elif got == 0:
            raise ValueError(f"no readable samples in {len(urls)} shard(s), e.g. {urls[0]}")


def slot_batches(
    plan: ShardPlan, slot: int, state: dict, map_fn: MapFn, shuffle_buffer: int = 0, cache_bytes: int = 0
) -> Iterator[dict]:
    """Full batches of one slot forever, starting at ``state`` ({"epoch", "raw", "batches"}); each carries __pos__.
    Up to ``cache_bytes`` of the slot's undecoded samples stay in memory for the later epochs (:class:`SampleCache`).
    """
    epoch, skip, n_batches = state["epoch"], state["raw"], state["batches"]
    cache = SampleCache(cache_bytes) if cache_bytes > 0 else None
    while True:
        errors: Counter = Counter()
        stream = epoch_samples(plan, slot, epoch, errors, shuffle_buffer, cache)
        raw = 0
        for _ in range(skip):  # resume: drop what the saved run already consumed, without decoding it
            next(stream)
            raw += 1
        if skip:
            errors.clear()  # what the skipped part met was counted by the saved run (DataPosition.errors)
        skip = 0
        batch: list[dict] = []
        failed_in_row = 0
        while n_batches < plan.batches_per_slot:
            sample = next(stream)
            raw += 1
            reason = None
            try:
                item = map_fn(sample, random.Random(f"aug-{plan.seed}-{epoch}-{sample['__key__']}"))
            except KeyError:
                reason = "missing_field"
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):  # EOFError: empty .npy
                reason = "decode_error"
            if reason is not None:
                errors[reason] += 1
                failed_in_row += 1
                if failed_in_row > max(plan.samples, 1):  # more than a whole pass over the slot's share: none usable
                    raise ValueError(
                        f"no usable sample in {failed_in_row} read in a row ({dict(errors)}): the shards lack what "
                        "this trainer reads, or none decodes"
                    )
                continue
            failed_in_row = 0
            batch.append(item)
            if len(batch) == plan.batch_size:
                n_batches += 1
                out = default_collate(batch)
                out["__pos__"] = {"slot": slot, "epoch": epoch, "raw": raw, "batches": n_batches}
                out["__errors__"] = dict(errors)
                errors.clear()
                yield out
                batch = []
        epoch, n_batches = epoch + 1, 0


# ------------------------------------------------------------------------------------------------- dataset


class ShardStream(IterableDataset):
    """The batches of one rank; workers take the slots of this rank, rotated so a resumed run keeps the order."""

    def __init__(
        self,
        plan: ShardPlan,
        rank: int,
        map_fn: MapFn,
        position: DataPosition,
        shuffle_buffer: int = 0,
        cache_bytes: int = 0,
    ):
        super().__init__()
        self.plan, self.rank, self.map_fn, self.shuffle_buffer = plan, rank, map_fn, shuffle_buffer
        self.cache_bytes = cache_bytes
        self.start = position.to_dict()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers = max(1, self.plan.workers)
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != n_workers:
            raise RuntimeError(f"plan is for {n_workers} workers, DataLoader runs {info.num_workers if info else 1}")
        # The DataLoader asks workers for batches round-robin from worker 0. Batch c of this rank belongs to
        # logical worker c % W, so a run resumed after c batches gives physical worker w the role (w + c) % W.
        logical = (worker + self.start["batches"]) % n_workers
        slot = self.rank * n_workers + logical
        state = self.start["slots"].get(str(slot), {"epoch": self.start["epoch"], "raw": 0, "batches": 0})
        yield from slot_batches(self.plan, slot, state, self.map_fn, self.shuffle_buffer, self.cache_bytes)


@dataclass
class DataPosition:
    """Where one rank's stream stands: batches consumed, each slot's position, and the bad samples seen."""

    batches: int = 0  # batches this rank has consumed
    epoch: int = 0  # epoch a slot without a saved position starts in
    slots: dict = field(default_factory=dict)  # str(slot) -> {"epoch", "raw", "batches"}
    errors: Counter = field(default_factory=Counter)  # reason -> count (corrupt_shard, decode_error, ...)

    def advance(self, batch: dict) -> dict:
        """Record a consumed batch's position and error counts; returns the batch without them."""
        pos = batch.pop("__pos__")
        self.errors.update(batch.pop("__errors__"))
        self.slots[str(pos["slot"])] = {"epoch": pos["epoch"], "raw": pos["raw"], "batches": pos["batches"]}
        self.batches += 1
        return batch

    def to_dict(self) -> dict:
        """A JSON-able copy."""
        return {"batches": self.batches, "epoch": self.epoch, "slots": dict(self.slots), "errors": dict(self.errors)}

    @classmethod
    def resumed(cls, doc: dict, rank: int, world_size: int, workers: int, data_plan: str) -> tuple[DataPosition, bool]:
        """The position a run continues from, and whether it is exact: ``rank``'s saved one when the checkpoint
        ``doc`` has the same ranks, workers and sample stream (``data_plan``), else :meth:`after_layout_change`."""
        same = doc["world_size"] == world_size and doc["workers"] == workers
        if same and doc.get("data_plan", data_plan) == data_plan:  # batch, seed, shards, ...
            return cls.from_dict(doc["data"][rank]), True
        return cls.after_layout_change(doc["data"], rank), False

    @classmethod
    def after_layout_change(cls, docs: list[dict], rank: int = 0) -> DataPosition:
        """Where a run continues when its ranks or workers changed (saved positions of every rank, ``to_dict``):
        the start of the epoch after the furthest one any slot had begun; the start epoch itself if none had
        consumed anything since. A position's own ``batches`` restart at each change, so they cannot tell. Rank 0
        carries on the error counts of all the saved ranks (the others start from none: the sum stays the sum)."""
        furthest = max(max((s["epoch"] for s in d["slots"].values()), default=d.get("epoch", 0) - 1) for d in docs)
        errors = sum((Counter(d.get("errors", {})) for d in docs), start=Counter()) if rank == 0 else Counter()
        return cls(epoch=furthest + 1, errors=errors)

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        """Inverse of :meth:`to_dict`."""
        return cls(d["batches"], d.get("epoch", 0), dict(d["slots"]), Counter(d.get("errors", {})))


def make_loader(plan: ShardPlan, cfg: LoaderConfig, rank: int, map_fn: MapFn, position: DataPosition) -> DataLoader:
    """A DataLoader over this rank's batches, decoding in ``cfg.workers`` persistent workers; creating and iterating
    it leaves the global RNGs alone."""
    ds = ShardStream(plan, rank, map_fn, position, cfg.shuffle_buffer, cfg.cache_mb << 20)
    # The loader's own generator draws the workers' base seed; without it ``iter(loader)`` takes a number from the
    # global torch RNG, and a resumed run's dropout would no longer follow the uninterrupted run's stream.
    seed = random.Random(f"loader-{cfg.seed}-{rank}-{position.epoch}-{position.batches}").getrandbits(63)
    kwargs = {}
    if cfg.workers > 0:
        kwargs = {"persistent_workers": True, "prefetch_factor": cfg.prefetch_factor}
    return DataLoader(
        ds,
        batch_size=None,  # the slots batch themselves
        num_workers=cfg.workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
