"""Curation end to end in one process: global percentile, dedup with named twins, reasons, order, even reshards."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from pipeline.curate.scorer import load_scorer
from pipeline.curate.select import select
from pipeline.curate.stage import curate_dataset
from pipeline.recipe import CurateSection
from pipeline.shards import iter_samples, read_parquet, shard_urls
from pipeline.stats import StageStats
from tests.pipeline.curate.helpers import jpeg, make_tiny_clip, write_dataset


def table_of(scores_by_shard):
    rows = []
    for s, scores in enumerate(scores_by_shard):
        for i, sc in enumerate(scores):
            rows.append({"key": f"{s:06d}{i:06d}", "shard": f"{s:06d}", "caption": f"caption number {s} {i}",
                         "clip_score": sc, "error": None, "sha256": f"{s}-{i}", "phash": None})  # fmt: skip
    return pd.DataFrame(rows)


def test_keep_fraction_is_global_not_per_shard():
    # shard 0 scores high, shard 1 low: a per-shard percentile would keep half of each
    t = table_of([[0.9, 0.8, 0.85, 0.95], [0.1, 0.2, 0.15, 0.05]])
    cfg = CurateSection(
        clip={"model": "x"}, keep_fraction=0.5, dedup={"phash_distance": None, "embedding_threshold": None}
    )
    sel = select(t, np.zeros((8, 4), np.float32), cfg)
    assert list(sel.kept) == [True] * 4 + [False] * 4
    assert sel.threshold == pytest.approx(0.8) and sel.rule["pool"] == 8
    assert list(sel.status[4:]) == ["low_clip_score"] * 4
    fixed = select(t, np.zeros((8, 4), np.float32), cfg.model_copy(update={"keep_fraction": None, "min_score": 0.12}))
    assert fixed.kept.sum() == 6 and fixed.rule == {"min_score": 0.12}


def test_order_overlap_and_highest_score_twin():
    t = table_of([[0.9, 0.5, 0.7, 0.2], [0.3, 0.6]])
    t.loc[5, "sha256"] = t.loc[0, "sha256"]  # 000001000001 is a copy of 000000000000 (higher score: kept)
    t.loc[2, "sha256"] = t.loc[3, "sha256"]  # 000000000002 (0.7) and 000000000003 (0.2): the 0.7 one is kept
    t.loc[3, "caption"] = "logo"  # ... but 000000000003 is a placeholder first: it never reaches dedup
    cfg = CurateSection(
        clip={"model": "x"}, min_score=0.4, dedup={"phash_distance": None, "embedding_threshold": None}
    )
    sel = select(t, np.zeros((6, 4), np.float32), cfg)
    assert sel.order == ["decode_error", "caption_too_short", "caption_too_long", "placeholder_caption",
                         "exact_duplicate", "low_clip_score"]  # fmt: skip
    assert dict(zip(t["key"], sel.status, strict=True)) == {
        "000000000000": "success", "000000000001": "success", "000000000002": "success",
        "000000000003": "placeholder_caption", "000001000000": "low_clip_score", "000001000001": "exact_duplicate",
    }  # fmt: skip
    assert sel.duplicate_of[5] == "000000000000"
    funnel = {f["reason"]: f for f in sel.funnel}
    # on its own exact dedup also drops 000000000003 (a copy of the 0.7 one); in order the placeholder got it first
    assert funnel["exact_duplicate"]["alone"] == 2 and funnel["exact_duplicate"]["dropped"] == 1
    assert funnel["exact_duplicate"]["caught_earlier"] == 1  # the placeholder caption took one of its two
    assert sel.overlap["placeholder_caption"]["exact_duplicate"] == 1
    assert funnel["low_clip_score"]["alone"] == 2 and funnel["low_clip_score"]["dropped"] == 1
    assert sel.clusters == [{"kind": "exact_duplicate", "kept": "000000000000",
                             "members": [{"key": "000001000001", "detail": "same sha256"}]}]  # fmt: skip


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cur")
    model = make_tiny_clip(str(root / "model"))
    cols = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]
    names = ["red", "green", "blue", "yellow"]
    shards = []
    for s in range(3):
        shards.append([
            {"key": f"{s:06d}{i:06d}", "jpg": jpeg(cols[(s + i) % 4], noise_seed=100 * s + i),
             "caption": f"a {names[(s + i) % 4]} tile number {i}"}
            for i in range(14)
        ])  # fmt: skip
    shards[2][5]["jpg"] = shards[0][3]["jpg"]  # planted exact duplicate across shards
    shards[1][2]["caption"] = "IMG_0042.jpg"  # boilerplate
    shards[1][7]["jpg"] = b"broken"
    src = write_dataset(str(root / "src"), shards)
    cfg = CurateSection(clip={"model": model}, keep_fraction=0.7, shard_size=10, workers=0, batch_size=16,
                        tags=["red", "green", "blue", "yellow"], report=False,
                        dedup={"phash_distance": 0, "embedding_threshold": 0.9999})  # fmt: skip
    dst = str(root / "out")
    manifest = curate_dataset(src, dst, cfg, load_scorer(model, device="cpu"))
    return src, dst, manifest


def test_every_input_sample_is_one_row_kept_or_with_a_reason(curated):
    src, dst, m = curated
    rows = read_parquet(dst)
    assert len(rows) == 42 and rows["key"].is_unique
    kept = rows[rows["status"] == "success"]
    assert m["stats"]["seen"] == 42 and m["stats"]["kept"] == len(kept) == m["samples"]
    StageStats.from_dict(m["stats"]).check()
    assert dict(rows.loc[rows["status"] != "success", "status"].value_counts()) == m["stats"]["dropped"]
    by_key = rows.set_index("key")
    assert by_key.loc["000001000002", "status"] == "placeholder_caption"
    assert by_key.loc["000001000007", "status"] == "decode_error"
    dup = by_key.loc["000002000005"] if by_key.loc["000002000005", "status"] == "exact_duplicate" else None
    twin = by_key.loc["000000000003"]
    if dup is None:  # the shard-0 copy scored lower (same image, other caption): it is the one dropped
        dup, twin = by_key.loc["000000000003"], by_key.loc["000002000005"]
    assert dup["status"] == "exact_duplicate" and dup["duplicate_of"] in ("000000000003", "000002000005")
    assert twin["status"] != "exact_duplicate" and dup["clip_score"] <= twin["clip_score"]
    assert m["filter_order"][-1] == "low_clip_score" and m["filter_order"].index("exact_duplicate") == 4


def test_kept_fraction_and_threshold_are_global(curated):
    _, dst, m = curated
    dec = pd.read_parquet(os.path.join(dst, "decisions.parquet"))
    pool = dec[dec["status"].isin(["success", "low_clip_score"])]["clip_score"].to_numpy()
    assert m["threshold_rule"]["pool"] == len(pool)
    assert m["clip_threshold"] == pytest.approx(np.sort(pool)[::-1][int(np.ceil(0.7 * len(pool))) - 1])
    kept = dec[dec["status"] == "success"]
    assert kept["clip_score"].min() >= m["clip_threshold"] and len(kept) == int(np.ceil(0.7 * len(pool)))


def test_reshards_are_even_and_carry_scores(curated):
    src, dst, m = curated
    sizes = [s["samples"] for s in m["shards"]]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 10 and sum(sizes) == m["samples"]
    dec = pd.read_parquet(os.path.join(dst, "decisions.parquet")).set_index("key")
    seen = []
    for url in shard_urls(dst):
        for s in iter_samples(url):
            meta = s["json"]
            seen.append(s["__key__"])
            assert meta["clip_score"] == pytest.approx(dec.loc[s["__key__"], "clip_score"], abs=1e-6)
            assert meta["clip_model"].startswith("local-dir:") and len(meta["clip_checkpoint_sha256"]) == 64
            assert meta["clip_preprocess"].startswith("resize") and meta["tags"][0]["label"] in (
                "red",
                "green",
                "blue",
                "yellow",
            )
            assert s["txt"] and s["jpg"][:2] == b"\xff\xd8"
    assert seen == sorted(seen) and len(seen) == m["samples"]
    assert m["parent"] == os.path.join(src, "manifest.json") or m["parent"] is None
    assert m["clip"]["clip_checkpoint_sha256"] and json.dumps(m["overlap"])


def test_rerun_with_another_cut_rewrites_without_new_inference(curated, monkeypatch):
    src, dst, m = curated
    import pipeline.curate.stage as stage

    monkeypatch.setattr(stage, "score_shard", lambda *a, **k: pytest.fail("scored again"))
    from pipeline.curate.scorer import load_scorer as ls

    model = m["clip"]["clip_model"].removeprefix("local-dir:")
    cfg = CurateSection.model_validate({**m["config"], "keep_fraction": None, "min_score": -1.0})
    m2 = curate_dataset(src, dst, cfg, ls(model, device="cpu"))
    assert m2["stats"]["dropped"].get("low_clip_score", 0) == 0 and m2["samples"] > m["samples"]
    assert len(read_parquet(dst)) == 42


def small_source(root, tag: str, n: int = 6) -> str:
    cols = [(220, 30, 30), (30, 30, 220)]
    samples = [
        {"key": f"{tag}{i:05d}", "jpg": jpeg(cols[i % 2], noise_seed=i), "caption": f"a {tag} tile {i}"}
        for i in range(n)
    ]
    return write_dataset(str(root), [samples])


def small_cfg(model: str, **kw) -> CurateSection:
    return CurateSection(clip={"model": model}, keep_fraction=1.0, workers=0, batch_size=8, report=False,
                         dedup={"phash_distance": None, "embedding_threshold": None}, **kw)  # fmt: skip


def test_output_that_would_destroy_data_is_refused(curated, tmp_path):
    src, dst, m = curated
    model = m["clip"]["clip_model"].removeprefix("local-dir:")
    scorer = load_scorer(model, device="cpu")
    before = sorted(os.listdir(src))
    with pytest.raises(ValueError, match="is the input dataset"):
        curate_dataset(src, src, small_cfg(model), scorer)
    with pytest.raises(ValueError, match="is the input dataset"):
        curate_dataset(src, src + "/", small_cfg(model), scorer)
    other = small_source(tmp_path / "other", "o")  # a dataset curate did not write
    with pytest.raises(ValueError, match="shard\\(s\\) that curation did not write"):
        curate_dataset(src, other, small_cfg(model), scorer)
    assert sorted(os.listdir(src)) == before and sorted(os.listdir(other))[0] == "000000.parquet"
    with pytest.raises(ValueError, match="is the output itself"):
        curate_dataset(src, dst, small_cfg(model), scorer, previous=os.path.join(dst, "manifest.json"))


def test_rerun_on_other_input_with_the_same_shard_names_rescores(curated, tmp_path):
    _, _, m = curated
    model = m["clip"]["clip_model"].removeprefix("local-dir:")
    scorer = load_scorer(model, device="cpu")
    a, b = small_source(tmp_path / "a", "a"), small_source(tmp_path / "b", "b", n=5)
    out = str(tmp_path / "out")
    curate_dataset(a, out, small_cfg(model, tags=["red", "blue"]), scorer)
    m2 = curate_dataset(b, out, small_cfg(model, tags=["cat", "dog", "bird"]), scorer)
    rows = read_parquet(out)
    assert sorted(rows["key"]) == [f"b{i:05d}" for i in range(5)] and m2["samples"] == 5
    for url in shard_urls(out):  # the tags of this run, not the first one's
        for s in iter_samples(url):
            assert {t["label"] for t in s["json"]["tags"]} <= {"cat", "dog", "bird"}


def test_corrupt_source_shard_is_one_line_naming_it(curated, tmp_path):
    _, _, m = curated
    model = m["clip"]["clip_model"].removeprefix("local-dir:")
    src = small_source(tmp_path / "src", "c", n=40)
    tar = os.path.join(src, "000000.tar")
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2)
    with pytest.raises(ValueError) as e:
        curate_dataset(src, str(tmp_path / "out"), small_cfg(model), load_scorer(model, device="cpu"))
    assert tar in str(e.value) and "corrupt or truncated shard" in str(e.value) and "\n" not in str(e.value)


def test_a_twin_dropped_by_a_later_dedup_is_resolved_to_the_member_that_stayed():
    t = table_of([[0.9, 0.8, 0.7]])  # keys 000000000000 (C), ...01 (A), ...02 (B)
    t.loc[2, "sha256"] = t.loc[1, "sha256"]  # B is an exact copy of A (A scores higher: A is the twin)
    t["phash"] = ["0" * 16, "0" * 16, "f" * 16]  # A is a phash near-duplicate of C (C scores higher)
    cfg = CurateSection(clip={"model": "x"}, min_score=0.0, dedup={"phash_distance": 2, "embedding_threshold": None})
    sel = select(t, np.zeros((3, 4), np.float32), cfg)
    assert list(sel.status) == ["success", "near_duplicate_phash", "exact_duplicate"]
    assert sel.duplicate_of[2] == "000000000000" and "via 000000000001" in sel.detail[2]
    assert {c["kind"]: c["kept"] for c in sel.clusters} == {"exact_duplicate": "000000000000",
                                                           "near_duplicate_phash": "000000000000"}  # fmt: skip


def test_a_versioned_root_is_curated_with_its_lineage_and_accepted_as_previous(tmp_path):
    from flows.runners import check_manifest
    from pipeline.curate.stage import parent_manifest_url
    from tests.pipeline.test_versions import two_versions

    root = str(tmp_path / "ds")
    _, _, v2, _ = two_versions(root)
    latest = os.path.join(v2.url, "manifest.json")
    for src in (root, root + "/", os.path.join(root, "versions.json"), v2.url, latest):  # read as the latest version
        assert parent_manifest_url(src) == latest, src
    assert parent_manifest_url(os.path.join(v2.url, "{000002..000002}.tar")) is None  # a pattern has no manifest
    assert parent_manifest_url(str(tmp_path / "nothing")) is None
    check_manifest(root, what="--previous", versioned=True)  # the report's diff reads a root as its latest version
    with pytest.raises(RuntimeError, match="no manifest.json there"):
        check_manifest(root, what="a dataset")  # without versioned=True a root is not a dataset
    from flows.run import preflight
    from flows.runners import placement_of
    from pipeline.latents import parent_manifest_url as latents_parent
    from pipeline.recipe import parse_recipe

    for src in (root, os.path.join(root, "versions.json"), v2.url):  # encode records the version it reads
        assert latents_parent(src) == latest, src
    recipe = parse_recipe({"name": "r", "output": str(tmp_path / "o"), "sources": [{"kind": "demo_site"}],
                           "train": [{"kind": "vae", "config": "tiny", "data": root, "steps": 2}]})  # fmt: skip
    preflight(recipe, str(tmp_path / "o"), placement_of(recipe.runtime))  # trainers read a root as its latest
    os.makedirs(tmp_path / "empty")
    open(tmp_path / "empty" / "versions.json", "w").write("{}")
    with pytest.raises(RuntimeError, match="--previous .*no manifest and no versions"):
        check_manifest(str(tmp_path / "empty"), what="--previous", versioned=True)
