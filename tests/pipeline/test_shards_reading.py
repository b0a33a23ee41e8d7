"""Reading shards: every corrupt or cut tar is counted, repeated keys stay apart, long keys can be written."""

import io
import tarfile
from collections import Counter

import pytest

from pipeline import shards
from pipeline.stats import StageStats
from tests.pipeline.test_shards import make_sample, write_shard


def write_tar(path, members, fmt=tarfile.GNU_FORMAT) -> bytes:
    """A tar of ``(name, bytes)`` members as other tools write them; returns its bytes."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def sample_members(name: str, tag: str) -> list:
    return [(f"{name}.jpg", f"image {tag}".encode()), (f"{name}.txt", f"caption {tag}".encode())]


def read(path) -> tuple[list, Counter]:
    errors = Counter()
    got = list(shards.iter_samples(str(path), decode=False, errors=errors))
    return got, errors


def header_of(path, key: str, ext: str) -> int:
    with tarfile.open(path) as tar:
        return next(m.offset for m in tar.getmembers() if m.name == f"{key}.{ext}")


def _bad_checksum(b: bytearray, off: int) -> None:
    b[off + 148 : off + 156] = b"9999999\0"


def _garbage_header(b: bytearray, off: int) -> None:
    b[off : off + 512] = b"A" * 512


def _lone_zero_block(b: bytearray, off: int) -> None:
    b[off : off + 512] = bytes(512)  # a zero block with more members after it is no end of the archive


@pytest.mark.parametrize("damage", [_bad_checksum, _garbage_header, _lone_zero_block])
def test_a_broken_header_mid_shard_is_counted(tmp_path, damage):
    write_shard(tmp_path, 0, 6)
    path = tmp_path / "000000.tar"
    data = bytearray(path.read_bytes())
    damage(data, header_of(path, "k00003", "jpg"))
    path.write_bytes(bytes(data))
    got, errors = read(path)
    assert errors == {"corrupt_shard": 1}
    assert [s["__key__"] for s in got] == ["k00000", "k00001"]  # k00002 may have lost members: dropped
    with pytest.raises(tarfile.ReadError):
        list(shards.iter_samples(str(path)))


def test_no_cut_point_reads_as_a_clean_shorter_shard(tmp_path):
    write_shard(tmp_path, 0, 4)
    data = (tmp_path / "000000.tar").read_bytes()
    members_end = len(data.rstrip(b"\0"))
    members_end += -members_end % 512  # the last member's data ends on a block boundary
    cut = tmp_path / "cut.tar"
    for n in [*range(1, members_end + 512, 29), members_end, members_end + 511]:
        cut.write_bytes(data[:n])
        got, errors = read(cut)
        assert errors == {"corrupt_shard": 1}, n
        assert len(got) < 4, n
    for n in (members_end + 512, members_end + 1000, len(data)):  # one zero block then EOF ends a tar (GNU tar)
        cut.write_bytes(data[:n])
        got, errors = read(cut)
        assert not errors and len(got) == 4, n


def test_the_end_of_a_large_shard_is_found_past_the_read_ahead(tmp_path):
    big = bytes(range(256)) * 1200  # members far larger than tarfile's 10 KiB reads and the bytes kept
    path = tmp_path / "big.tar"
    data = write_tar(path, [("a.bin", big), ("a.txt", b"x"), ("b.bin", big * 2), ("b.txt", b"y")])
    got, errors = read(path)
    assert not errors and [len(s["bin"]) for s in got] == [len(big), 2 * len(big)]
    path.write_bytes(data[: header_of(path, "b", "txt")])
    got, errors = read(path)
    assert errors == {"corrupt_shard": 1} and [s["__key__"] for s in got] == ["a"]


def test_a_corrupt_shard_on_an_object_store_is_counted(s3_bucket):
    import fsspec

    prefix, opts = s3_bucket
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in sample_members("a", "1") + sample_members("b", "2") + sample_members("c", "3"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = bytearray(buf.getvalue())
    _bad_checksum(data, 4 * 1024)  # the header of c.jpg: each member is one header and one data block
    with fsspec.open(f"{prefix}/bad.tar", "wb", **opts) as f:
        f.write(bytes(data))
    errors = Counter()
    got = list(shards.iter_samples(f"{prefix}/bad.tar", opts, decode=False, errors=errors))
    assert errors == {"corrupt_shard": 1} and [s["__key__"] for s in got] == ["a"]


def test_a_key_written_twice_in_a_row_is_two_samples(tmp_path):
    members = sample_members("a", "1") + sample_members("k", "2") + sample_members("k", "3") + sample_members("z", "4")
    write_tar(tmp_path / "dup.tar", members)
    got, errors = read(tmp_path / "dup.tar")
    assert not errors
    assert [(s["__key__"], s["txt"]) for s in got] == [
        ("a", b"caption 1"),
        ("k", b"caption 2"),
        ("k", b"caption 3"),  # the second copy is its own sample: the consumers' duplicate-key checks see it
        ("z", b"caption 4"),
    ]


def test_samples_in_other_directories_are_not_merged(tmp_path):
    members = sample_members("d1/k", "1") + sample_members("d2/k", "2") + [("d2/k.json", b"{}")]
    write_tar(tmp_path / "dirs.tar", members)
    got, errors = read(tmp_path / "dirs.tar")
    assert not errors
    assert [(s["__key__"], s["txt"], "json" in s) for s in got] == [
        ("k", b"caption 1", False),
        ("k", b"caption 2", True),
    ]


def test_long_and_non_ascii_keys_are_written_and_read(tmp_path):
    import webdataset as wds

    keys = ["L" * 300, "ключ-日本-😀" * 12, "k00001"]
    for name, order in (("shuffled", keys), ("sorted", sorted(keys))):
        with shards.ShardWriter(str(tmp_path / name), 0) as w:
            for key in order:
                w.write({**make_sample(keys.index(key)), "__key__": key})
            w.publish(StageStats(seen=3, kept=3))
    path = tmp_path / "shuffled" / "000000.tar"
    assert path.read_bytes() == (tmp_path / "sorted" / "000000.tar").read_bytes()
    got, errors = read(path)
    assert not errors and [s["__key__"] for s in got] == sorted(keys)
    assert [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)] == sorted(keys)


def test_short_ascii_names_write_the_bytes_ustar_did(tmp_path):
    write_shard(tmp_path, 0, 3)
    path = tmp_path / "000000.tar"
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(tmp_path / "ustar.tar", "w", format=tarfile.USTAR_FORMAT) as dst:
        for m, data in members:
            dst.addfile(m, io.BytesIO(data))
    assert path.read_bytes() == (tmp_path / "ustar.tar").read_bytes()  # shards written before PAX stay identical
