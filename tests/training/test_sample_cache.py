"""The loader's in-memory sample cache and fast .npy reads: the same stream, faults and errors as without them."""

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch

from tests.training.shard_faults import damage_shards
from training.data import DataPosition, LoaderConfig, SampleCache, make_loader, make_plan, slot_batches
from training.latent_data import _npy
from training.synthetic import write_demo_shards

torch.set_num_threads(1)


def editing_map(sample: dict, rng: random.Random) -> dict:
    """A map that edits its sample (as a careless one might) and fails on a broken image."""
    image = sample.pop("jpg")
    sample["jpg"] = b"edited"
    if image[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    return {"key": sample["__key__"], "aug": torch.tensor(rng.random())}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_demo_shards(str(root), 120, seed=2, size=16, per_shard=20)  # 6 shards, 3 of them damaged
    damage_shards(root)
    return str(root)


def stream(plan, slot: int, cache_bytes: int, n: int) -> list[tuple]:
    it = slot_batches(plan, slot, {"epoch": 0, "raw": 0, "batches": 0}, editing_map, 7, cache_bytes)
    out = []
    for _ in range(n):
        b = next(it)
        out.append((b["key"], b["aug"].tolist(), b["__pos__"], b["__errors__"]))
    return out


@pytest.mark.parametrize("split", ["shard", "sample"])
def test_the_cached_stream_is_the_uncached_one_faults_and_all(bad_shards, split):
    cfg = LoaderConfig(batch_size=4, workers=0, seed=5, split=split)
    plan = make_plan(bad_shards, cfg, world_size=2)
    n = 4 * plan.batches_per_slot  # four epochs: the later ones come from the cache
    for slot in range(plan.slots):
        plain = stream(plan, slot, 0, n)
        assert any(errors for *_, errors in plain)  # the damaged shards show in the batches' error counts
        assert stream(plan, slot, 1 << 30, n) == plain  # everything held
        assert stream(plan, slot, 12_000, n) == plain  # room for some shards only: the rest are read each time


def test_the_cache_holds_whole_shards_within_its_budget_and_replays_their_faults(bad_shards, tmp_path):
    url = f"{bad_shards}/000002.tar"  # cut inside a member: a corrupt_shard each read
    cache = SampleCache(1 << 30)
    first, again = Counter(), Counter()
    got = [s["__key__"] for s in cache.read(url, first)]
    assert first["corrupt_shard"] == 1 and url in cache.shards and cache.used > 0
    assert [s["__key__"] for s in cache.read(url, again)] == got and again == first
    tiny = SampleCache(1000)  # less than one shard
    assert [s["__key__"] for s in tiny.read(url, Counter())] == got and not tiny.shards and tiny.used == 0
    part = SampleCache(1 << 30)
    reader = part.read(url, Counter())
    next(reader)  # a consumer that stops early leaves nothing half held
    reader.close()
    assert not part.shards


def test_the_loader_caches_by_default_and_cache_mb_0_turns_it_off(bad_shards):
    keys = {}
    for mb in (1024, 0):
        cfg = LoaderConfig(batch_size=4, workers=1, seed=1, cache_mb=mb)
        plan = make_plan(bad_shards, cfg, world_size=1)
        it = iter(make_loader(plan, cfg, 0, editing_map, DataPosition()))
        keys[mb] = [k for _ in range(3 * plan.steps_per_epoch) for k in next(it)["key"]]
    assert keys[1024] == keys[0]
    with pytest.raises(ValueError, match="cache_mb"):
        LoaderConfig(cache_mb=-1)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(24, dtype=np.float16).reshape(2, 3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.arange(5, dtype=">f4"),
        np.zeros((1, 3), dtype=np.float32),
    ],
    ids=["float16", "fortran", "big-endian", "row"],
)
def test_fast_npy_reads_what_np_load_reads(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    data = buf.getvalue()
    for _ in range(2):  # the first read parses the header, the second takes the fast path
        out = _npy(data)
        assert out.dtype == torch.float32 and out.shape == arr.shape
        assert torch.equal(out, torch.from_numpy(arr.astype(np.float32)))
    with pytest.raises(ValueError):
        _npy(data[:-3])  # a cut array, on the fast path
    with pytest.raises(ValueError):
        _npy(b"\x93NUMPY\x01")  # a cut header
