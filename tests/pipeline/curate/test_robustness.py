"""Curation on bad inputs: non-finite scores, failed reruns, stale output, odd metadata, repeated keys."""

import base64
import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from pipeline.curate.pairs import clean_meta
from pipeline.curate.report import CLUSTER_MEMBERS, tags_html
from pipeline.curate.scorer import load_scorer
from pipeline.curate.scores import source_identity
from pipeline.curate.select import select
from pipeline.curate.stage import curate_dataset
from pipeline.recipe import CurateSection
from pipeline.shards import ShardWriter, read_parquet
from pipeline.stats import StageStats
from tests.pipeline.curate.helpers import COLS, cfg, jpeg, make_tiny_clip, write_dataset


def samples(n: int, prefix: str = "k", seed0: int = 0) -> list[dict]:
    return [
        {"key": f"{prefix}{i:05d}", "jpg": jpeg(COLS[i % 4], noise_seed=seed0 + i), "caption": f"a tile number {i}"}
        for i in range(n)
    ]


def raw_shard(root: str, items: list[dict]) -> str:
    with ShardWriter(root, 0) as w:
        for it in items:
            w.write(it)
        w.add_row({"key": "x"})
        w.publish(StageStats(seen=len(items), kept=len(items)))
    return root


def test_non_finite_scores_never_pass_a_cut():
    t = pd.DataFrame({"key": list("abcde"), "caption": ["x one"] * 5, "error": [None] * 5,
                      "clip_score": np.array([0.1, 0.2, np.nan, 0.3, np.inf], np.float32),
                      "sha256": list("12345"), "phash": [None] * 5})  # fmt: skip
    for kw in ({"keep_fraction": 0.5}, {"keep_fraction": None, "min_score": 0.15}):
        sel = select(t, np.eye(5, dtype=np.float32), cfg("x", **kw))
        assert sel.status[2] == sel.status[4] == "low_clip_score", kw
        assert sel.status[1] == sel.status[3] == "success"
    assert sel.rule == {"min_score": 0.15}
    sel = select(t, np.eye(5, dtype=np.float32), cfg("x", keep_fraction=0.5))
    assert sel.rule["pool"] == 3


def test_a_model_that_scores_nan_drops_every_pair_with_a_reason(model, tmp_path):
    bad = tmp_path / "nan_model"
    bad.mkdir()
    for f in os.listdir(model):
        (bad / f).write_bytes(open(os.path.join(model, f), "rb").read())
    sd = load_file(str(bad / "open_clip_model.safetensors"))
    sd["visual.proj"] = sd["visual.proj"] * float("nan")
    save_file(sd, str(bad / "open_clip_model.safetensors"))
    src = write_dataset(str(tmp_path / "src"), [samples(6)])
    m = curate_dataset(src, str(tmp_path / "out"), cfg(str(bad), keep_fraction=0.5), load_scorer(str(bad)))
    assert m["stats"]["kept"] == 0 and m["stats"]["dropped"] == {"decode_error": 6}
    assert all(e.startswith("non-finite CLIP score") for e in read_parquet(str(tmp_path / "out"))["error"])


def test_a_rerun_that_fails_in_pass_2_leaves_no_manifest(model, scorer, tmp_path, monkeypatch):
    import pipeline.curate.stage as stage

    src, dst = write_dataset(str(tmp_path / "src"), [samples(12)]), str(tmp_path / "out")
    curate_dataset(src, dst, cfg(model, shard_size=4, report=True), scorer)
    assert os.path.exists(f"{dst}/manifest.json") and os.path.exists(f"{dst}/review/index.html")

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(stage, "curate_shard", boom)
    with pytest.raises(KeyboardInterrupt):
        curate_dataset(src, dst, cfg(model, shard_size=4, keep_fraction=0.5), scorer)
    assert not os.path.exists(f"{dst}/manifest.json") and not os.path.exists(f"{dst}/review")


def test_output_shards_follow_a_new_detail_and_a_new_model(model, scorer, tmp_path):
    src, dst = write_dataset(str(tmp_path / "src"), [samples(8)]), str(tmp_path / "out")
    for cut in (-1.0, -0.99):
        curate_dataset(src, dst, cfg(model, keep_fraction=None, min_score=cut), scorer)
    rows = read_parquet(dst)
    assert not rows["error"].dropna().str.contains("-1.0000").any()
    other = make_tiny_clip(str(tmp_path / "model2"))  # same weights, another place: only provenance differs
    curate_dataset(src, dst, cfg(other), load_scorer(other, device="cpu"))
    assert set(read_parquet(dst)["clip_pretrained"]) == {os.path.join(other, "open_clip_model.safetensors")}


def test_undecodable_images_get_no_tags(model, scorer, tmp_path):
    s = samples(4)
    s[0]["jpg"] = b"broken"
    src, dst = write_dataset(str(tmp_path / "src"), [s]), str(tmp_path / "out")
    curate_dataset(src, dst, cfg(model, tags=["cat", "dog"]), scorer)
    rows = pd.read_parquet(f"{dst}/decisions.parquet").set_index("key")
    assert pd.isna(rows.loc["k00000", "tags"]) and isinstance(rows.loc["k00001", "tags"], str)
    table = pd.DataFrame({"tags": [None, np.nan, json.dumps([{"label": "dog", "p": 1.0}])]})
    assert "<td>dog</td><td>1</td>" in tags_html(table, np.array([True, True, True]))


def test_one_local_input_named_several_ways_is_one_identity(tmp_path, monkeypatch):
    src = write_dataset(str(tmp_path / "src"), [samples(1)])
    monkeypatch.chdir(tmp_path)
    names = ["src/000000.tar", "./src/000000.tar", f"{src}/000000.tar", "src//000000.tar"]
    assert len({source_identity(n) for n in names}) == 1


def test_non_finite_min_score_is_refused():
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(ValueError, match="finite"):
            CurateSection.model_validate({"clip": {"model": "x"}, "min_score": bad})


def test_a_key_in_two_input_shards_is_refused_naming_both(model, scorer, tmp_path):
    src = write_dataset(str(tmp_path / "src"), [samples(3), samples(3, seed0=50)])
    with pytest.raises(ValueError, match=r"'k00000' is in source shards 000000.tar and 000001.tar"):
        curate_dataset(src, str(tmp_path / "out"), cfg(model), scorer)


def test_bad_metadata_types_are_cleaned_not_fatal(model, scorer, tmp_path):
    assert clean_meta({"width": "40", "height": 40.5, "sha256": 5, "phash": "zz", "url": ["a"]}) == {
        "width": 40, "height": None, "original_width": None, "original_height": None,
        "url": None, "page_url": None, "sha256": None, "phash": None,
    }  # fmt: skip
    assert clean_meta({"phash": "ABCDEF0123456789"})["phash"] == "abcdef0123456789"
    assert clean_meta({"sha256": " AB12 "})["sha256"] == "ab12"  # an upper-case hash from another tool matches
    src = str(tmp_path / "src")
    os.makedirs(src)
    with tarfile.open(f"{src}/000000.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        for i, key in enumerate(("caf\xe9", "plain")):
            for ext, b in (("jpg", jpeg(COLS[i], noise_seed=i)), ("txt", b"a red tile"), ("json", b'{"phash": 7}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(b)
                t.addfile(info, io.BytesIO(b))
    m = curate_dataset(src + "/{000000..000000}.tar", str(tmp_path / "out"), cfg(model), scorer)
    assert m["stats"]["kept"] == 2


def test_missing_hashes_and_sizes_are_filled_from_the_image(model, scorer, tmp_path):
    img = jpeg(COLS[0], noise_seed=1)
    items = [{"__key__": f"a{i}", "jpg": img, "txt": f"a red tile {i}", "json": {"url": "u"}} for i in range(3)]
    items.append({"__key__": "a3", "jpg": jpeg(COLS[2], noise_seed=9), "txt": "a blue tile", "json": {}})
    src, dst = raw_shard(str(tmp_path / "src"), items), str(tmp_path / "out")
    m = curate_dataset(src, dst, cfg(model, min_image_size=10), scorer)
    assert m["stats"]["dropped"] == {"exact_duplicate": 2}
    rows = read_parquet(dst)
    assert rows["phash"].str.len().eq(16).all() and (rows["width"] == 40).all()
    dedup = {"exact": False, "phash_distance": 0, "embedding_threshold": None}
    m = curate_dataset(src, dst, cfg(model, dedup=dedup), scorer)
    assert m["stats"]["dropped"] == {"near_duplicate_phash": 2}


def test_report_shows_at_most_a_dozen_members_per_cluster(model, scorer, tmp_path):
    img = jpeg(COLS[0], noise_seed=1)
    s = [{"key": f"k{i:04d}", "jpg": img, "caption": f"product photo number {i}"} for i in range(20)]
    src, dst = write_dataset(str(tmp_path / "src"), [s]), str(tmp_path / "out")
    curate_dataset(src, dst, cfg(model, report=True), scorer)
    page = open(f"{dst}/review/index.html", encoding="utf-8").read()
    assert f"… and {19 - CLUSTER_MEMBERS} more" in page
    assert "k0019" not in page.split("id='dups-h'")[1].split("id='tags-h'")[0]


def test_metadata_with_a_lone_surrogate_escape_is_written_with_a_replacement_character(model, scorer, tmp_path):
    items = [
        {
            "__key__": f"s{i}",
            "jpg": jpeg(COLS[i], noise_seed=i),
            "txt": f"a tile {i}",
            "json": b'{"url": "u", "alt": "smile \\ud83d"}',
        }  # fmt: skip  # an emoji cut in half by a JS tool
        for i in range(2)
    ]
    src, dst = raw_shard(str(tmp_path / "src"), items), str(tmp_path / "out")
    m = curate_dataset(src, dst, cfg(model), scorer)  # pass 2 failed here with UnicodeEncodeError
    assert m["stats"]["kept"] == 2
    with tarfile.open(f"{dst}/000000.tar") as t:
        metas = [json.loads(t.extractfile(n).read()) for n in t.getnames() if n.endswith(".json")]
    assert [meta["alt"] for meta in metas] == ["smile \ufffd"] * 2


def test_keep_fraction_keeps_exactly_its_share_when_it_lands_on_a_whole_number():
    from pipeline.curate.filters import fraction_threshold

    scores = np.linspace(0.0, 1.0, 25)
    for frac, n in ((0.28, 7), (0.52, 13), (0.04, 1), (0.2, 5)):  # 0.28 * 25 is 7.000000000000001 in floats
        assert (scores >= fraction_threshold(scores, frac)).sum() == n, frac
    hundred = np.linspace(0.0, 1.0, 100)
    assert all((hundred >= fraction_threshold(hundred, f)).sum() == round(f * 100) for f in (0.07, 0.14, 0.55, 0.29))


def test_report_cards_show_transparent_images_on_white_and_clip_sees_them_so(model, scorer, tmp_path):
    from PIL import Image

    from pipeline.curate.report import thumbnail

    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (75, 75, 125, 125))  # a black square on transparency
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    uri = thumbnail(buf.getvalue())
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        arr = np.asarray(im.convert("L"))
    assert arr[5, 5] > 240 and arr[64, 64] < 20  # the background is white, the square black (all black before)


def test_report_captions_are_cut_and_keys_cannot_break_the_layout(model, scorer, tmp_path):
    long = "word " * 60_000  # a 300 kB keyword-stuffed caption
    s = [{"key": f"k{i:04d}", "jpg": jpeg(COLS[i % 4], noise_seed=i), "caption": long} for i in range(12)]
    s.append({"key": "z" * 60 + "\u202e", "jpg": jpeg(COLS[1], noise_seed=99), "caption": "a green tile"})
    src, dst = write_dataset(str(tmp_path / "src"), [s]), str(tmp_path / "out")
    curate_dataset(src, dst, cfg(model, report=True), scorer)
    page = open(f"{dst}/review/index.html", encoding="utf-8").read()
    assert len(page) < 400_000, len(page)  # 12 whole captions made 3.6 MB
    assert page.count(" chars)</div>") >= 12
    assert "overflow-wrap: anywhere; unicode-bidi: isolate" in page


def test_a_duplicate_of_a_duplicate_says_so_in_its_cluster_and_phash_64_is_refused(model, scorer, tmp_path):
    import re

    red = jpeg((220, 30, 30))
    s = [
        {"key": "0c", "jpg": jpeg((225, 35, 30)), "caption": "a red square", "phash": "d6d629c621d6d628"},
        {"key": "a1", "jpg": red, "caption": "a red square too"},  # a near duplicate of 0c
        {"key": "b2", "jpg": red, "caption": "red square again"},  # a byte copy of a1
    ]
    src, dst = write_dataset(str(tmp_path / "src"), [s]), str(tmp_path / "out")
    dedup = {"exact": True, "phash_distance": 4, "embedding_threshold": None}
    curate_dataset(src, dst, cfg(model, report=True, dedup=dedup, dedup_keep="first_key"), scorer)
    rows = pd.read_parquet(f"{dst}/decisions.parquet").set_index("key")
    assert rows.loc["b2", "detail"] == "same sha256, via a1" and rows.loc["b2", "duplicate_of"] == "0c"
    page = open(f"{dst}/review/index.html", encoding="utf-8").read()
    b2_cards = re.findall(r'data-key="b2">.*?<div class="muted">([^<]*)</div></div>', page)
    assert b2_cards and set(b2_cards) == {"same sha256, via a1"}  # the cluster card said "same sha256" (as 0c's)
    with pytest.raises(ValueError, match="less than or equal to 63"):  # at 64 bits any two images are twins
        cfg(model, dedup={"phash_distance": 64})
