"""The shard loader: determinism, rank balance, shuffle-before-split, exact resume with workers, bad samples."""

import dataclasses
import io
import json
import random
import tarfile
from collections import Counter

import pytest
import torch

from tests.training.shard_faults import damage_shards
from training.data import DataPosition, LoaderConfig, make_loader, make_plan, slot_batches
from training.synthetic import write_demo_shards

torch.set_num_threads(1)


def key_map(sample: dict, rng: random.Random) -> dict:
    """Test map: keep the key, decode nothing but check the image field exists."""
    if sample["jpg"][:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    return {"key": sample["__key__"], "aug": torch.tensor(rng.random())}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_demo_shards(str(root), 240, seed=3, size=16, per_shard=30)  # 8 shards of 30
    return str(root)


def position_after(plan, cfg: LoaderConfig, k: int) -> DataPosition:
    """The data position after ``k`` batches of rank 0, saved and restored as a checkpoint does."""
    pos = DataPosition()
    it = iter(make_loader(plan, cfg, 0, key_map, pos))
    for _ in range(k):
        pos.advance(next(it))
    return DataPosition.from_dict(pos.to_dict())


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_plan_reads_sizes_and_balances_ranks(shards):
    cfg = LoaderConfig(batch_size=10, workers=2, seed=1, shuffle_buffer=0)
    plan = make_plan(shards, cfg, world_size=2)
    assert plan.samples == 240 and len(plan.urls) == 8
    # 240 samples over 4 slots of 10-sample batches: 6 full batches per slot, 12 steps per rank per epoch
    assert plan.batches_per_slot == 6 and plan.steps_per_epoch == 12
    for epoch in range(3):
        per_slot = [slot_batches(plan, s, {"epoch": epoch, "raw": 0, "batches": 0}, key_map) for s in range(4)]
        seen = [keys_of(take(g, plan.batches_per_slot)) for g in per_slot]
        assert all(len(k) == 60 for k in seen)  # every slot (so every rank) gets the same number of full batches
        flat = [k for ks in seen for k in ks]
        assert len(set(flat)) == 240  # shard split: disjoint slots, the whole epoch covered
        # the next batch of every slot is already the next epoch's first
        assert all(next(g)["__pos__"]["epoch"] == epoch + 1 for g in per_slot)


def test_shards_are_shuffled_before_the_split(shards):
    plan = make_plan(shards, LoaderConfig(batch_size=10, workers=1, seed=5), world_size=2)
    rank0 = [tuple(plan.slot_shards(0, e)[0]) for e in range(6)]
    assert len(set(rank0)) > 1  # rank 0 does not read the same subset every epoch
    assert len({u for shards_ in rank0 for u in shards_}) > 4  # over epochs it sees more than half the shards
    for e in range(3):  # within an epoch the two ranks split the permuted list without overlap
        assert not set(plan.slot_shards(0, e)[0]) & set(plan.slot_shards(1, e)[0])


def test_same_seed_same_stream_other_seed_other_stream(shards):
    def first_keys(seed):
        plan = make_plan(shards, LoaderConfig(batch_size=8, workers=0, seed=seed, shuffle_buffer=50), 1)
        loader = make_loader(plan, LoaderConfig(8, 0, seed, 50), 0, key_map, DataPosition())
        it = iter(loader)
        return keys_of(take(it, 5))

    assert first_keys(0) == first_keys(0)
    assert first_keys(0) != first_keys(1)


def test_sample_split_is_independent_of_world_size(shards):
    """With split="sample" and no buffer, a global batch holds the same samples on 1 rank or 2."""
    one = make_plan(shards, LoaderConfig(batch_size=12, workers=0, seed=2, shuffle_buffer=0, split="sample"), 1)
    two = make_plan(shards, LoaderConfig(batch_size=6, workers=0, seed=2, shuffle_buffer=0, split="sample"), 2)
    start = {"epoch": 0, "raw": 0, "batches": 0}
    g1 = slot_batches(one, 0, start, key_map)
    g2 = [slot_batches(two, s, start, key_map) for s in range(2)]
    for _ in range(5):
        assert sorted(next(g1)["key"]) == sorted(next(g2[0])["key"] + next(g2[1])["key"])


def test_resume_with_workers_continues_exactly(shards):
    cfg = LoaderConfig(batch_size=7, workers=2, seed=4, shuffle_buffer=20)
    plan = make_plan(shards, cfg, world_size=1)
    full = iter(make_loader(plan, cfg, 0, key_map, DataPosition()))
    reference = [next(full) for _ in range(2 * plan.steps_per_epoch + 3)]  # crosses two epoch boundaries
    for k in (3, plan.steps_per_epoch + 1):  # an odd count: the worker roles must rotate on resume
        resumed = iter(make_loader(plan, cfg, 0, key_map, position_after(plan, cfg, k)))
        for ref in reference[k:]:
            got = next(resumed)
            assert got["key"] == ref["key"]
            assert torch.equal(got["aug"], ref["aug"])  # augmentation randomness is reproduced too


def test_corrupt_samples_are_counted_and_skipped(tmp_path):
    root = tmp_path / "bad"
    write_demo_shards(str(root), 60, seed=1, size=16, per_shard=20)
    broken = damage_shards(root)
    cfg = LoaderConfig(batch_size=5, workers=0, seed=0, shuffle_buffer=0)
    plan = make_plan(str(root), cfg, 1)
    pos = DataPosition()
    it = iter(make_loader(plan, cfg, 0, key_map, pos))
    keys = keys_of(pos.advance(next(it)) for _ in range(plan.steps_per_epoch))
    assert len(keys) == plan.steps_per_epoch * 5  # still full batches
    assert broken not in keys
    assert pos.errors["decode_error"] >= 1
    assert pos.errors["corrupt_shard"] >= 1
    assert pos.errors["missing_from_shard"] >= 10


def empty_npy_or_bomb(sample, rng):
    """key_map, except that two samples fail the way a 0-byte latent.npy and a decompression bomb do."""
    import numpy as np
    from PIL import Image

    if sample["__key__"].endswith("3"):
        np.load(io.BytesIO(b""))  # EOFError: No data left in file
    if sample["__key__"].endswith("7"):
        raise Image.DecompressionBombError("too many pixels")
    return key_map(sample, rng)


def test_empty_arrays_and_bombs_are_counted_not_fatal(tmp_path):
    write_demo_shards(str(tmp_path / "d"), 40, seed=2, size=16, per_shard=20)
    cfg = LoaderConfig(batch_size=4, workers=0, seed=0, shuffle_buffer=0)
    plan = make_plan(str(tmp_path / "d"), cfg, 1)
    pos = DataPosition()
    it = iter(make_loader(plan, cfg, 0, empty_npy_or_bomb, pos))
    keys = keys_of(pos.advance(next(it)) for _ in range(plan.steps_per_epoch))
    assert keys and not any(k.endswith(("3", "7")) for k in keys)
    assert pos.errors["decode_error"] >= 2


def test_empty_and_unreadable_shards_leave_no_slot_without_data(tmp_path):
    root = tmp_path / "d"
    write_demo_shards(str(root), 60, seed=4, size=16, per_shard=20)  # shards 000000..000002
    with tarfile.open(root / "000003.tar", "w"):
        pass  # an empty shard, as a scrape whose every download failed writes
    sizes = json.loads((root / "sizes.json").read_text())
    (root / "sizes.json").write_text(json.dumps({**sizes, "000003.tar": 0}))
    (root / "000001.tar").write_bytes(b"\0garbage" * 512)  # unreadable, though sizes.json promises 20 samples
    cfg = LoaderConfig(batch_size=4, workers=3, seed=0, shuffle_buffer=0)
    plan = make_plan(str(root), cfg, 1)
    assert "000003.tar" not in " ".join(plan.urls)  # dealt to no slot
    for epoch in range(3):  # every deal: the slot that gets only the unreadable shard reads its share of the rest
        for slot in range(plan.slots):
            state = {"epoch": epoch, "raw": 0, "batches": 0}
            batch = next(slot_batches(plan, slot, state, key_map))
            assert len(batch["key"]) == 4
    with pytest.raises(ValueError, match=r"3 sample\(s\) cannot feed 4 loader slot\(s\)") as err:
        write_demo_shards(str(tmp_path / "tiny"), 3, seed=5, size=16, per_shard=3)
        make_plan(str(tmp_path / "tiny"), dataclasses.replace(cfg, workers=4), 1)
    assert "\n" not in str(err.value)


def test_a_resume_does_not_count_the_skipped_part_s_errors_again(tmp_path):
    root = tmp_path / "bad"
    write_demo_shards(str(root), 60, seed=1, size=16, per_shard=20)
    t1 = root / "000001.tar"
    t1.write_bytes(t1.read_bytes()[: len(t1.read_bytes()) // 2])  # 10 samples short of its sizes.json entry
    cfg = LoaderConfig(batch_size=5, workers=0, seed=0, shuffle_buffer=0)
    plan = make_plan(str(root), cfg, 1)
    n = 2 * plan.steps_per_epoch
    whole = DataPosition()
    it = iter(make_loader(plan, cfg, 0, key_map, whole))
    for _ in range(n):
        whole.advance(next(it))
    for k in (plan.steps_per_epoch - 1, plan.steps_per_epoch + 2):  # resume points after the short shard was read
        resumed = position_after(plan, cfg, k)
        it = iter(make_loader(plan, cfg, 0, key_map, resumed))
        for _ in range(n - k):
            resumed.advance(next(it))
        assert resumed.errors == whole.errors and whole.errors["missing_from_shard"] > 0, (k, resumed.errors)


def test_a_second_layout_change_continues_after_the_furthest_epoch(shards):
    cfg = LoaderConfig(batch_size=7, workers=2, seed=4, shuffle_buffer=0)
    plan = make_plan(shards, cfg, world_size=1)
    pos = DataPosition()
    it = iter(make_loader(plan, cfg, 0, key_map, pos))
    for _ in range(plan.steps_per_epoch + 1):  # into epoch 1
        pos.advance(next(it))
    first = DataPosition.after_layout_change([pos.to_dict()])
    assert first.epoch == 2 and first.batches == 0  # the next epoch boundary
    assert DataPosition.after_layout_change([first.to_dict()]).epoch == 2  # nothing consumed since: stay
    # after the first change the run trains into epoch 3; batches restarted at 0, so they alone would say epoch 1
    again = DataPosition(epoch=2)
    it = iter(make_loader(plan, cfg, 0, key_map, again))
    for _ in range(plan.steps_per_epoch + 1):
        again.advance(next(it))
    assert again.batches == plan.steps_per_epoch + 1
    assert DataPosition.after_layout_change([again.to_dict(), first.to_dict()]).epoch == 4


def test_the_plan_fingerprint_changes_with_what_decides_the_stream(shards, tmp_path):
    import shutil

    from training.data import plan_fingerprint

    cfg = LoaderConfig(batch_size=7, workers=2, seed=4, shuffle_buffer=20)
    base = plan_fingerprint(make_plan(shards, cfg, 1), cfg)
    assert base == plan_fingerprint(make_plan(shards, cfg, 2), cfg)  # ranks and workers are compared on their own
    moved = shutil.copytree(shards, tmp_path / "moved")
    assert base == plan_fingerprint(make_plan(str(moved), cfg, 1), cfg)  # the same shards elsewhere
    for change in ({"batch_size": 8}, {"seed": 5}, {"shuffle_buffer": 0}, {"split": "sample"}):
        other = dataclasses.replace(cfg, **change)
        assert plan_fingerprint(make_plan(shards, other, 1), other) != base, change
    other = tmp_path / "other"  # another shard list: the same samples cut into shards of 40
    write_demo_shards(str(other), 240, seed=3, size=16, per_shard=40)
    assert plan_fingerprint(make_plan(str(other), cfg, 1), cfg) != base


@pytest.mark.parametrize(("batch_size", "workers", "world_size"), [(10, 0, 1), (7, 0, 1), (10, 2, 2)])
def test_an_epoch_is_one_pass_even_with_a_buffer_larger_than_the_data(shards, batch_size, workers, world_size):
    """A buffer that never drained mixed wrapped samples into every epoch: some twice (even in one batch, a false
    negative for the contrastive loss), others never. One epoch takes every sample at most once, and all of them
    but the ones past each slot's last full batch."""
    cfg = LoaderConfig(batch_size=batch_size, workers=workers, seed=3, shuffle_buffer=1000)  # 240 samples
    plan = make_plan(shards, cfg, world_size)
    for epoch in range(2):
        keys = []
        for slot in range(plan.slots):
            it = slot_batches(plan, slot, {"epoch": epoch, "raw": 0, "batches": 0}, key_map, cfg.shuffle_buffer)
            keys += keys_of(take(it, plan.batches_per_slot))
            assert next(it)["__pos__"]["epoch"] == epoch + 1  # and the slot moves on to the next epoch
        assert len(keys) == len(set(keys)), epoch  # no sample twice in an epoch
        # all but the partial last batch of each slot: 240 // 7 = 34 batches leave 2 samples out
        assert len(keys) == plan.slots * plan.batches_per_slot * batch_size >= 240 - plan.slots * (batch_size - 1)
    first = keys_of(take(slot_batches(plan, 0, {"epoch": 0, "raw": 0, "batches": 0}, key_map, 1000), 2))
    assert first != sorted(first)  # the buffer still shuffles


def test_a_slot_short_of_its_batches_wraps_only_after_its_whole_share(tmp_path):
    """Shards of unequal size dealt to two slots: the short slot repeats samples only once all of its own came."""
    root = tmp_path / "d"
    write_demo_shards(str(root), 60, seed=6, size=16, per_shard=20)  # 3 shards of 20
    cfg = LoaderConfig(batch_size=5, workers=2, seed=0, shuffle_buffer=1000)
    plan = make_plan(str(root), cfg, 1)  # 60 // (2 x 5) = 6 batches per slot: one slot has 40, the other 20
    for slot in range(plan.slots):
        keys = keys_of(take(slot_batches(plan, slot, {"epoch": 0, "raw": 0, "batches": 0}, key_map, 1000), 6))
        share = len(set(keys))
        assert share in (20, 30)  # the long slot stops at its 30th sample; the short one has 20
        assert len(set(keys[:share])) == share  # its whole share comes first, each sample once


def test_error_line_is_the_workers_own_message():
    from training.data import error_line

    wrapped = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "/x/training/data.py", line 1, in f\n    raise ValueError("bad thing: details")\n'
        "ValueError: bad thing: details\nhint: do X"
    )
    assert error_line(wrapped) == "bad thing: details"
    assert error_line(ValueError("one line\nmore")) == "one line"


def test_a_short_shard_is_counted_once_an_epoch_whatever_the_slots(tmp_path):
    root = tmp_path / "bad"
    write_demo_shards(str(root), 60, seed=1, size=16, per_shard=20)
    t1 = root / "000001.tar"
    t1.write_bytes(t1.read_bytes()[: len(t1.read_bytes()) // 2])  # 10 samples short of its sizes.json entry
    seen = {}
    for split, workers in (("shard", 0), ("sample", 0), ("sample", 2)):
        cfg = LoaderConfig(batch_size=5, workers=workers, seed=0, shuffle_buffer=0, split=split)
        plan = make_plan(str(root), cfg, 1)
        pos = DataPosition()
        it = iter(make_loader(plan, cfg, 0, key_map, pos))
        for _ in range(plan.steps_per_epoch):  # one epoch: slots that fall short wrap and read the shard again
            pos.advance(next(it))
        seen[split, workers] = {k: pos.errors[k] for k in ("corrupt_shard", "missing_from_shard")}
    assert seen[("shard", 0)]["missing_from_shard"] >= 9  # half of a 20-sample shard, less a partly read one
    assert seen[("sample", 0)] == seen[("sample", 2)] == seen[("shard", 0)], seen  # once, whoever reads it


def test_error_counts_survive_a_layout_change_once():
    saved = [
        {"batches": 4, "epoch": 0, "slots": {"0": {"epoch": 1, "raw": 5, "batches": 2}}, "errors": {"bad": 7}},
        {"batches": 4, "epoch": 0, "slots": {"1": {"epoch": 1, "raw": 5, "batches": 2}}, "errors": {"bad": 2}},
    ]
    ranks = [DataPosition.after_layout_change(saved, rank) for rank in range(3)]  # two ranks become three
    assert [p.epoch for p in ranks] == [2, 2, 2]
    assert ranks[0].errors == Counter({"bad": 9}) and not ranks[1].errors and not ranks[2].errors
    doc = {"world_size": 2, "workers": 0, "data_plan": "x", "data": saved}
    assert DataPosition.resumed(doc, 0, 1, 0, "x")[0].errors == Counter({"bad": 9})


def test_a_cut_sizes_json_or_manifest_is_one_line_naming_the_file(shards, tmp_path):
    import shutil

    for name, text, named in (
        ("sizes.json", '{"000000.tar": 30,\n', "sizes.json: not valid JSON"),  # a full disk cut it short
        ("sizes.json", '{"000000.tar": "thirty"}', "sizes.json: not a count of samples for '000000.tar'"),
        ("manifest.json", '{"shards": [', "manifest.json: not valid JSON"),
        ("manifest.json", '{"shards": [{"nom": "000000.tar"}]}', "manifest.json: not a dataset manifest"),
    ):
        root = tmp_path / f"{name}-{len(text)}"
        shutil.copytree(shards, root)
        (root / name).write_text(text)
        with pytest.raises(ValueError) as e:
            make_plan(str(root), LoaderConfig(batch_size=10), world_size=1)
        assert named in str(e.value) and str(root) in str(e.value) and "\n" not in str(e.value), e.value


def test_a_damaged_logvar_is_a_counted_skip_not_a_dead_run():
    import numpy as np

    from training.latent_data import latent_map

    def npy(a) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    def sample(logvar_shape) -> dict:
        latent = npy(np.zeros((4, 8, 8), np.float16))
        logvar = npy(np.zeros(logvar_shape, np.float16))
        return {"__key__": "k", "latent.npy": latent, "logvar.npy": logvar, "txt": b"a red circle"}

    assert latent_map(sample((4, 8, 8)), random.Random(0), 0.5, False, 0.0, 0.0, (4, 8, 8))["latent"].shape == (
        4,
        8,
        8,
    )
    # a ValueError is what the loader counts as a decode_error and skips (a RuntimeError from torch ended the run)
    with pytest.raises(ValueError, match=r"logvar of shape \(4, 4, 4\) beside a latent of \(4, 8, 8\)"):
        latent_map(sample((4, 4, 4)), random.Random(0), 0.5, False, 0.0, 0.0, (4, 8, 8))
    with pytest.raises(ValueError, match="logvar"):  # a logvar where the dataset's first sample had none
        latent_map(sample((4, 8, 8)), random.Random(0), None, False, 0.0, 0.0, (4, 8, 8))
