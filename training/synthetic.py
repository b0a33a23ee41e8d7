"""Demo-site shards straight from the scene generator, for tests, benchmarks and experiments without the scraper."""

from __future__ import annotations

import io
import random

from pipeline.demo_site import describe, different_scene, random_scene, render_scene, scene_attributes
from pipeline.manifest import build_manifest, write_manifest
from pipeline.shards import ShardWriter
from pipeline.stats import StageStats


def write_demo_shards(
    dst: str,
    n: int,  # samples in all
    seed: int = 0,
    size: int = 64,  # pixels, square image side
    mismatch_rate: float = 0.0,  # fraction of captions that describe another scene (label noise, like the scrape)
    per_shard: int = 1000,  # samples per shard
    p_two: float = 0.35,  # probability of a two-shape scene
    quality: int = 95,  # JPEG quality
) -> list[str]:
    """Render ``n`` demo scenes with their captions into shards + sizes.json + manifest.json; returns the tar paths."""
    rng = random.Random(seed)
    paths = []
    for index, start in enumerate(range(0, n, per_shard)):
        stats = StageStats()
        with ShardWriter(dst, index) as w:
            for i in range(start, min(n, start + per_shard)):
                spec = random_scene(rng, p_two=p_two)
                matches = rng.random() >= mismatch_rate
                caption = describe(spec if matches else different_scene(spec, rng), rng)
                buf = io.BytesIO()
                render_scene(spec, size).save(buf, format="JPEG", quality=quality)
                key = f"s{seed}_{i:07d}"
                meta = {"attributes": scene_attributes(spec), "matches": matches, "alt": caption}
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption, "json": meta})
                w.add_row({"key": key, "caption": caption, "status": "success", "width": size, "height": size})
                stats.seen += 1
                stats.kept += 1
            w.publish(stats)
        paths.append(f"{dst}/{index:06d}.tar")
    write_manifest(dst, build_manifest(dst, stage="synthetic_demo", config={"n": n, "seed": seed, "size": size}))
    return paths
