"""Dedup: exact sha256, perceptual hash distance through bands, embedding cosine within k-means clusters."""

import io

import numpy as np
from PIL import Image

from pipeline.curate import dedup
from pipeline.images import hamming, phash


def test_exact_duplicates_point_at_first_occurrence():
    found = dedup.exact_duplicates(["a", "b", "a", None, "b", "a"])
    assert found == {2: (0, "same sha256"), 4: (1, "same sha256"), 5: (0, "same sha256")}


def test_phash_bands_find_every_pair_within_distance():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 200)]
    hashes = [f"{h:016x}" for h in base]
    # plant near copies at distances 0..4 of the first five hashes, and one at distance 5 of the sixth
    planted = {}
    for d in range(5):
        flipped = base[d]
        for bit in rng.choice(64, d, replace=False):
            flipped ^= 1 << int(bit)
        planted[len(hashes)] = d
        hashes.append(f"{flipped:016x}")
    far = base[5]
    for bit in range(5):
        far ^= 1 << (bit * 12)
    hashes.append(f"{far:016x}")
    found = dedup.phash_duplicates(hashes, 4)
    for i, d in planted.items():
        assert found[i] == (d, f"phash distance {hamming(hashes[i], hashes[d])}")
    assert len(hashes) - 1 not in found  # distance 5 stays
    # brute force agrees: nothing else in this random set is within 4 bits
    assert set(found) == set(planted)


def test_phash_of_a_reencoded_image_is_a_near_duplicate():
    rng = np.random.default_rng(1)
    arr = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((128, 128), Image.Resampling.BILINEAR)
    other = Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=40)
    recoded = Image.open(io.BytesIO(buf.getvalue()))
    hashes = [phash(img), phash(other), phash(recoded)]
    found = dedup.phash_duplicates(hashes, 4)
    assert list(found) == [2] and found[2][0] == 0


def test_embedding_duplicates_within_clusters_keep_priority_order():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    twin = x[10] + 0.02 * rng.normal(size=16).astype(np.float32)
    x = np.vstack([x, twin / np.linalg.norm(twin)])
    found = dedup.embedding_duplicates(x, 0.98)
    assert list(found) == [300]
    j, detail = found[300]
    assert j == 10 and detail.startswith("cosine 0.9")
    # reversed priority: the copy comes first, so the original is the one dropped
    rev = dedup.embedding_duplicates(x[::-1].copy(), 0.98)
    assert rev == {len(x) - 1 - 10: (0, rev[len(x) - 1 - 10][1])}


def test_kmeans_separates_obvious_clusters():
    rng = np.random.default_rng(3)
    centers = np.eye(8, dtype=np.float32)[:3]
    x = np.vstack([c + 0.05 * rng.normal(size=(50, 8)) for c in centers]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assign = dedup.kmeans(x, 3)
    for block in range(3):
        assert len(set(assign[block * 50 : (block + 1) * 50])) == 1
    assert len(set(assign)) == 3
