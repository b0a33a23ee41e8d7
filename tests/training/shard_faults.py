"""Damaged image shards for the loader tests."""

import io
import tarfile
from pathlib import Path


def damage_shards(root: Path) -> str:
    """Break one image of shard 0 (same length, not a JPEG), cut shard 1 short at a block boundary (it reads as
    shorter) and shard 2 inside a member (the tar reader fails); returns the key of the broken image."""
    path = root / "000000.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data[member.offset_data : member.offset_data + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    t1 = root / "000001.tar"
    t1.write_bytes(t1.read_bytes()[: len(t1.read_bytes()) // 2])
    t2 = root / "000002.tar"
    with tarfile.open(t2) as tar:
        cut = [m for m in tar.getmembers() if m.name.endswith(".jpg")][5].offset_data + 10
    t2.write_bytes(t2.read_bytes()[:cut])
    return member.name.rsplit("/", 1)[-1].split(".")[0]
