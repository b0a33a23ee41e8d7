"""Quality, loose version: a CLIP trained for a minute on demo-site pairs finds the planted mismatched captions.

The full measurement (the real demo site scraped, a small CLIP trained for minutes) is in BENCHMARKS.md
(benchmarks/curate_quality.py); this keeps the same pipeline under test within the suite's time limit.
"""

import random

import numpy as np
import pytest

from pipeline.curate.scorer import load_scorer
from pipeline.curate.stage import curate_dataset
from pipeline.demo_site import describe, different_scene, random_scene, render_scene
from pipeline.recipe import CurateSection
from pipeline.shards import ShardWriter, read_parquet, write_sizes
from pipeline.stats import StageStats

N, MISMATCH = 360, 0.2


def demo_pairs(root: str, seed: int = 0) -> set[str]:
    """Demo-site scenes with their alt text, a fifth of them describing another scene; returns mismatched keys."""
    import io

    rng = random.Random(seed)
    bad = set(rng.sample(range(N), int(MISMATCH * N)))
    for index in range(2):
        with ShardWriter(root, index) as w:
            for i in range(index * N // 2, (index + 1) * N // 2):
                spec = random_scene(rng, p_two=0.0)
                caption = describe(different_scene(spec, rng) if i in bad else spec, rng)
                buf = io.BytesIO()
                render_scene(spec, 32).convert("RGB").save(buf, "JPEG", quality=90)
                w.write({"__key__": f"{index:06d}{i:06d}", "jpg": buf.getvalue(), "txt": caption,
                         "json": {"sha256": f"s{i}", "caption": caption}})  # fmt: skip
            w.publish(StageStats(seen=N // 2, kept=N // 2))
    write_sizes(root)
    return {f"{i * 2 // N:06d}{i:06d}" for i in bad}


@pytest.mark.slow
def test_default_setting_removes_mismatched_pairs(tmp_path):
    from training.train_clip import ClipTrainConfig, train

    src = str(tmp_path / "src")
    bad = demo_pairs(src)
    run = str(tmp_path / "clip")
    train(ClipTrainConfig(data=src, out=run, model="micro", steps=120, batch_size=64, lr=0.005, warmup_steps=10,
                          workers=0, save_every=0, progress=False, log_every=1000))  # fmt: skip
    cfg = CurateSection(clip={"model": run}, report=False, dedup={"phash_distance": None, "embedding_threshold": None})
    curate_dataset(src, str(tmp_path / "out"), cfg, load_scorer(run, device="cpu"))
    rows = read_parquet(str(tmp_path / "out"))
    dropped = set(rows.loc[rows["status"] != "success", "key"])
    precision = len(dropped & bad) / max(1, len(dropped))
    recall = len(dropped & bad) / len(bad)
    is_bad = rows["key"].isin(bad).to_numpy()
    s = rows["clip_score"].to_numpy()
    auc = float((s[is_bad][:, None] < s[~is_bad][None, :]).mean())  # P(mismatched scores below matching)
    print(f"precision {precision:.3f} recall {recall:.3f} auc {auc:.3f}")
    # The default keep fraction 0.8 drops ~20%: chance gives precision = recall = 0.2 and AUC 0.5. Two minutes of
    # CPU training only go so far; the full-size measurement is in BENCHMARKS.md.
    assert auc >= 0.65
    assert precision >= 0.3 and recall >= 0.3
    assert np.isclose(len(dropped) / N, 0.2, atol=0.01)
