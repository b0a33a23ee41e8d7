"""Curation after a kill: files cut short, half-published output shards, and repeated keys named plainly."""

import io
import json
import os
import tarfile

import pytest

from pipeline import storage
from pipeline.curate.stage import curate_dataset
from pipeline.shards import done_shards, read_parquet
from tests.pipeline.curate.helpers import COLS, cfg, jpeg, write_dataset


def samples(n: int, seed0: int = 0) -> list[dict]:
    return [
        {"key": f"k{i:05d}", "jpg": jpeg(COLS[i % 4], noise_seed=seed0 + i), "caption": f"a tile number {i}"}
        for i in range(n)
    ]


def killing_writer(monkeypatch, marker: str):
    """storage.write_bytes that dies after truncating a file whose name holds ``marker``, as a SIGKILL would."""
    write = storage.write_bytes

    def write_bytes(url, data, storage_options=None):
        if marker in url.rsplit("/", 1)[-1]:
            open(url, "wb").close()
            raise KeyboardInterrupt("killed")
        write(url, data, storage_options)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)


def test_a_model_record_or_score_table_cut_short_is_scored_again(model, scorer, tmp_path):
    second = [{**s, "key": f"j{i:05d}"} for i, s in enumerate(samples(4, seed0=9))]
    src, dst = write_dataset(str(tmp_path / "src"), [samples(4), second]), str(tmp_path / "out")
    first = curate_dataset(src, dst, cfg(model), scorer)
    emb = f"{dst}/embeddings"
    before = os.stat(f"{emb}/model.json")
    curate_dataset(src, dst, cfg(model), scorer)
    after = os.stat(f"{emb}/model.json")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # unchanged: not rewritten

    open(f"{emb}/model.json", "wb").close()  # what an older run killed mid-write left
    again = curate_dataset(src, dst, cfg(model), scorer)
    assert json.load(open(f"{emb}/model.json")) == first["clip"] and again["samples"] == 8
    open(f"{emb}/metadata/metadata_000001.parquet", "wb").close()
    again = curate_dataset(src, dst, cfg(model), scorer)
    assert again["samples"] == 8 and os.path.getsize(f"{emb}/metadata/metadata_000001.parquet") > 0


def test_a_kill_while_writing_the_model_record_or_a_score_table_leaves_no_part(model, scorer, tmp_path, monkeypatch):
    src, dst = write_dataset(str(tmp_path / "src"), [samples(4)]), str(tmp_path / "out")
    curate_dataset(src, dst, cfg(model), scorer)
    emb = f"{dst}/embeddings"
    with monkeypatch.context() as m:
        killing_writer(m, "model.json")
        with pytest.raises(KeyboardInterrupt):  # new labels: the record is rewritten, and the kill comes then
            curate_dataset(src, dst, cfg(model, tags=["cat", "dog"]), scorer)
    assert json.load(open(f"{emb}/model.json"))["tags"] == []  # the old record, whole
    with monkeypatch.context() as m:
        killing_writer(m, "metadata_")
        with pytest.raises(KeyboardInterrupt):
            curate_dataset(src, dst, cfg(model, tags=["cat", "dog"]), scorer)
    assert not os.path.exists(f"{emb}/metadata/metadata_000000.parquet")  # not scored, rather than a cut marker
    m = curate_dataset(src, dst, cfg(model, tags=["cat", "dog"]), scorer)
    assert m["samples"] == 4 and m["clip"]["tags"] == ["cat", "dog"]
    assert not [n for n in os.listdir(emb) + os.listdir(f"{emb}/metadata") if n.startswith(".tmp-")]


def test_a_half_published_output_shard_goes_when_the_decisions_change(model, scorer, tmp_path):
    src, dst = write_dataset(str(tmp_path / "src"), [samples(8)]), str(tmp_path / "out")
    curate_dataset(src, dst, cfg(model, shard_size=2), scorer)
    assert done_shards(dst) == ["000000", "000001", "000002", "000003"]
    os.remove(f"{dst}/000003_stats.json")  # killed between renaming its tar and parquet and renaming its stats
    curate_dataset(src, dst, cfg(model, shard_size=4), scorer)  # other settings: fewer output shards
    assert sorted(n for n in os.listdir(dst) if n[:6].isdigit()) == [
        f"00000{i}{ext}" for i in (0, 1) for ext in (".parquet", ".tar", "_stats.json")
    ]
    assert len(read_parquet(dst)) == 8


def test_a_key_twice_in_one_input_shard_is_refused_naming_it_once(model, scorer, tmp_path):
    os.makedirs(tmp_path / "src")
    with tarfile.open(tmp_path / "src" / "000000.tar", "w") as tar:  # a tar this project did not write
        for name, data in [("a.jpg", jpeg((1, 2, 3))), ("a.txt", b"one"), ("b.jpg", jpeg((4, 5, 6))),
                           ("b.txt", b"two"), ("a.jpg", jpeg((7, 8, 9))), ("a.txt", b"again")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"^sample key 'a' is twice in source shard 000000.tar: keys must be"):
        curate_dataset(str(tmp_path / "src" / "000000.tar"), str(tmp_path / "out"), cfg(model), scorer)
