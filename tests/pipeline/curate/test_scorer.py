"""The scorer: every way of naming a model loads, and stored scores equal open_clip computed directly."""

import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pipeline.curate.scorer import load_scorer
from pipeline.curate.scores import is_scored, read_scores, score_files, score_shard
from pipeline.recipe import CurateSection
from pipeline.shards import iter_samples
from tests.conftest import in_netns
from tests.pipeline.curate.helpers import TINY_CFG, jpeg, make_tiny_clip, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CAPTIONS = ["a red square", "a green square", "a blue square", "something else entirely"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("src"))
    cols = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    samples = [
        {"key": f"000000{i:06d}", "jpg": jpeg(cols[i % 3], noise_seed=i), "caption": CAPTIONS[i % 4]}
        for i in range(11)
    ]
    write_dataset(root, [samples])
    return root


def direct_scores(model_dir, shard_url):
    """Cosine similarities computed with open_clip alone, the way its README does it."""
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + model_dir)
    tokenizer = open_clip.get_tokenizer("local-dir:" + model_dir)
    model.eval()
    out = []
    for s in iter_samples(shard_url, decode=False):
        image = preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            i = model.encode_image(image)
            t = model.encode_text(tokenizer([s["txt"].decode()]))
        i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        out.append((s["__key__"], float((i * t).sum()), i[0].numpy()))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_scores_equal_open_clip_direct(model_dir, dataset, tmp_path, workers):
    scorer = load_scorer(model_dir, device="cpu")
    cfg = CurateSection(clip={"model": model_dir}, batch_size=4, workers=workers, tags=["red", "green", "blue"])
    src = os.path.join(dataset, "000000.tar")
    emb = str(tmp_path / "emb")
    stats = score_shard(src, emb, cfg, scorer)
    assert (stats.seen, stats.kept) == (11, 11)
    assert is_scored(emb, src)
    table, img = read_scores(emb, ["000000"])
    want = direct_scores(model_dir, src)
    assert list(table["key"]) == [k for k, _, _ in want]
    np.testing.assert_allclose(table["clip_score"], [s for _, s, _ in want], atol=1e-5)
    np.testing.assert_allclose(img, np.stack([e for _, _, e in want]), atol=2e-3)  # stored as float16
    assert np.load(score_files(emb, "000000")["text"]).dtype == np.float16
    tags = [json.loads(t) for t in table["tags"]]
    assert all(len(t) == 3 and abs(sum(x["p"] for x in t) - 1) < 1e-3 for t in tags)


def test_every_way_of_naming_a_model(model_dir, tmp_path):
    weights = os.path.join(model_dir, "open_clip_model.safetensors")
    sha = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    a = load_scorer("local-dir:" + model_dir, device="cpu")
    b = load_scorer(model_dir, device="cpu")
    assert a.checkpoint_sha256 == b.checkpoint_sha256 == sha
    # architecture name + checkpoint file, the way pretrained weights are named
    cfg_path = tmp_path / "curate-test-tiny.json"
    cfg_path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_path)
    c = load_scorer("curate-test-tiny", pretrained=weights, device="cpu")
    assert c.model_id == "curate-test-tiny" and c.checkpoint_sha256 == sha
    x = torch.randn(2, 3, 32, 32)
    for s in (b, c):
        assert torch.allclose(s.encode(x, ["a", "b"])[0], a.encode(x, ["a", "b"])[0], atol=1e-5)
    # a name without weights: random init, recorded as such
    d = load_scorer("curate-test-tiny", device="cpu")
    assert d.pretrained is None and d.checkpoint_sha256 is None
    assert d.provenance()["clip_preprocess"].startswith("resize shortest")


# A real tag takes open_clip's download path; the hub is offline there (open_clip raises RuntimeError).
HUB_TAG = """\
import json
from pipeline.curate.scorer import load_scorer
try:
    load_scorer("ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu")
    print(json.dumps({"raised": None}))
except Exception as e:
    print(json.dumps({"raised": type(e).__name__, "message": str(e)}))
"""


def test_pretrained_tag_path_fails_in_one_line_without_the_hub(tmp_path):
    # in a fresh process, offline, with an empty hub cache, in its own network namespace: no packet can leave
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ROOT}
    cmd = in_netns([sys.executable, "-c", HUB_TAG])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["raised"] == "ValueError", got
    assert got["message"].startswith("cannot load CLIP model 'ViT-B-32' (pretrained='laion2b_s34b_b79k'): ")
    assert "\n" not in got["message"]
    assert not [f for _, _, files in os.walk(tmp_path / "hf") for f in files if f.endswith((".bin", ".safetensors"))]
    # an unknown tag is refused before any download
    with pytest.raises(ValueError) as e:
        load_scorer("RN50", pretrained="no-such-tag", device="cpu")
    assert "neither a pretrained tag" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not an open_clip model directory"):
        load_scorer("local-dir:/nonexistent/dir", device="cpu")


def test_undecodable_image_is_a_row_with_an_error(model_dir, tmp_path):
    root = str(tmp_path / "src")
    write_dataset(root, [[{"key": "000000000000", "jpg": jpeg((1, 2, 3)), "caption": "ok"}]])
    # corrupt the second sample by writing a shard by hand
    from pipeline.shards import ShardWriter
    from pipeline.stats import StageStats

    with ShardWriter(root, 1) as w:
        w.write({"__key__": "000001000000", "jpg": b"not a jpeg", "txt": "broken", "json": {}})
        w.write({"__key__": "000001000001", "jpg": jpeg((9, 9, 9)), "txt": "fine", "json": {}})
        w.publish(StageStats(seen=2, kept=2))
    scorer = load_scorer(model_dir, device="cpu")
    stats = score_shard(
        os.path.join(root, "000001.tar"), str(tmp_path / "e"), CurateSection(clip={"model": "x"}, workers=0), scorer
    )
    assert stats.seen == 2 and stats.kept == 1 and stats.dropped["decode_error"] == 1
    table, img = read_scores(str(tmp_path / "e"), ["000001"])
    assert np.isnan(table["clip_score"][0]) and table["error"][0] and not np.any(img[0])
    assert not np.isnan(table["clip_score"][1])


def test_preprocess_string_names_a_crop_only_when_there_is_one():
    from pipeline.curate.scorer import preprocess_string

    base = {"size": 64, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    assert "center crop 64" in preprocess_string({**base, "resize_mode": "shortest"})
    squash = preprocess_string({**base, "resize_mode": "squash"})
    assert squash.startswith("resize squash 64 bicubic, mean") and "crop" not in squash


def test_an_unknown_or_absent_device_is_a_one_line_error():
    from pipeline.curate.scorer import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda0", "bogus"):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no such CUDA device"):
            resolve_device("cuda")


def test_decode_workers_persist_across_shards_and_survive_an_abandoned_pass(model_dir, tmp_path):
    from pipeline.curate import pairs
    from pipeline.curate.pairs import pair_batches, pair_loader
    from pipeline.curate.scorer import score_pairs

    root = str(tmp_path / "src")
    shards = [
        [{"key": f"{s:06d}{i:06d}", "jpg": jpeg((40 * s, 90, 200), noise_seed=i), "caption": f"c{s} {i}"}
         for i in range(9)]
        for s in range(3)
    ]  # fmt: skip
    shards[1].append({"key": "000001000009", "jpg": b"not a jpeg", "caption": "broken"})
    write_dataset(root, shards)
    urls = [os.path.join(root, f"{s:06d}.tar") for s in range(3)]
    scorer = load_scorer(model_dir, device="cpu")
    want = [score_pairs(u, scorer, 4, 0) for u in urls]  # decoded inline

    _, loader = pair_loader(scorer, 4, 2)
    next(iter(pair_batches(urls[2], scorer, 4, 2)))  # a pass left after one batch
    cut = str(tmp_path / "cut.tar")
    with open(urls[0], "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[: os.path.getsize(urls[0]) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated shard") as e:
        score_pairs(cut, scorer, 4, 2)  # a shard that raises mid-pass
    assert cut in str(e.value) and "\n" not in str(e.value)
    pids = [w.pid for w in loader._iterator._workers]  # the worker processes of the persistent loader
    for url, (rows, img, _, scores) in zip(urls, want, strict=True):
        got_rows, got_img, _, got_scores = score_pairs(url, scorer, 4, 2)
        assert [r["key"] for r in got_rows] == [r["key"] for r in rows]  # this shard's samples, no stale ones
        assert [r["error"] is None for r in got_rows] == [r["error"] is None for r in rows]
        np.testing.assert_allclose(got_scores, scores, atol=1e-5)
        np.testing.assert_allclose(got_img, img, atol=1e-5)
    assert pair_loader(scorer, 4, 2)[1] is loader and [w.pid for w in loader._iterator._workers] == pids
    held = pair_batches(urls[0], scorer, 4, 2)
    next(held)  # a pass in progress holds the persistent loader: another (a second task thread) gets its own
    assert pairs._PAIR_LOCK.locked()
    np.testing.assert_allclose(score_pairs(urls[1], scorer, 4, 2)[3], want[1][3], atol=1e-5)
    held.close()
    assert not pairs._PAIR_LOCK.locked()
    assert pair_loader(scorer, 4, 2)[1] is loader and [w.pid for w in loader._iterator._workers] == pids
    assert len(pids) == 2 and all(w.is_alive() for w in loader._iterator._workers)
    assert pair_loader(scorer, 8, 2)[1] is not loader  # other settings: a new loader, the old one's workers end


def one_scored_shard(model_dir, tmp_path, n: int):
    """A shard of ``n`` pairs, a scorer, and the shard's scores decoded inline (what every pass must match)."""
    from pipeline.curate.scorer import score_pairs

    root = str(tmp_path / "src")
    write_dataset(root, [[{"key": f"000000{i:06d}", "jpg": jpeg((9, 99, 199), noise_seed=i), "caption": f"c {i}"}
                          for i in range(n)]])  # fmt: skip
    url = os.path.join(root, "000000.tar")
    scorer = load_scorer(model_dir, device="cpu")
    return url, scorer, score_pairs(url, scorer, 4, 0)[3]


def test_a_killed_decode_worker_fails_its_shard_and_the_next_one_starts_afresh(model_dir, tmp_path):
    import signal

    from pipeline.curate.pairs import pair_batches, pair_loader
    from pipeline.curate.scorer import score_pairs

    url, scorer, want = one_scored_shard(model_dir, tmp_path, 40)
    _, loader = pair_loader(scorer, 4, 2)
    passes = pair_batches(url, scorer, 4, 2)
    next(passes)
    victim = loader._iterator._workers[0].pid
    os.kill(victim, signal.SIGKILL)  # the OOM killer, say
    # torch's handler names the dead worker; or, when a chunk of its was in flight, the fetch of that chunk's
    # shared memory from it fails first (refused, or the socket at its end of file)
    with pytest.raises((RuntimeError, ConnectionResetError, EOFError)) as e:
        for _ in passes:
            pass
    assert e.type is not RuntimeError or "exited unexpectedly" in str(e.value) or "killed" in str(e.value)
    np.testing.assert_allclose(score_pairs(url, scorer, 4, 2)[3], want, atol=1e-5)  # the retry: new workers
    fresh = pair_loader(scorer, 4, 2)[1]
    assert fresh is not loader and victim not in [w.pid for w in fresh._iterator._workers]


def test_a_worker_killed_outside_the_loader_or_a_ctrl_c_in_its_reset_spares_the_next_shard(model_dir, tmp_path):
    import signal
    import time

    from pipeline.curate import pairs
    from pipeline.curate.pairs import pair_loader
    from pipeline.curate.scorer import score_pairs

    url, scorer, want = one_scored_shard(model_dir, tmp_path, 12)

    # killed while the main thread is in the model: torch raises there, outside the loader's own error path
    score_pairs(url, scorer, 4, 2)
    loader = pair_loader(scorer, 4, 2)[1]
    victim = loader._iterator._workers[0].pid
    encode = scorer.encode

    def encode_while_a_worker_dies(*args):
        scorer.encode = encode
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.5)
        return encode(*args)

    scorer.encode = encode_while_a_worker_dies
    try:
        score_pairs(url, scorer, 4, 2)
    except RuntimeError as e:  # the task fails wherever torch's signal handler finds the main thread
        assert "killed by signal" in str(e) or "exited unexpectedly" in str(e)
    scorer.encode = encode
    np.testing.assert_allclose(score_pairs(url, scorer, 4, 2)[3], want, atol=1e-5)  # the retry gets new workers
    assert victim not in [w.pid for w in pair_loader(scorer, 4, 2)[1]._iterator._workers]

    # killed between passes: the work the process does meanwhile (writing the shard's files) must not fail
    victim = pair_loader(scorer, 4, 2)[1]._iterator._workers[1].pid
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)
    os.waitid(os.P_PID, victim, os.WEXITED | os.WNOWAIT)  # dead (not reaped: torch's handler would still see it)
    np.testing.assert_allclose(score_pairs(url, scorer, 4, 2)[3], want, atol=1e-5)
    assert victim not in [w.pid for w in pair_loader(scorer, 4, 2)[1]._iterator._workers]

    # Ctrl-C while the workers reset for a pass: their unread acknowledgements must not reach the next pass
    loader = pair_loader(scorer, 4, 2)[1]
    get = type(loader._iterator)._get_data

    def interrupted(self):
        type(self)._get_data = get
        raise KeyboardInterrupt

    type(loader._iterator)._get_data = interrupted
    with pytest.raises(KeyboardInterrupt):
        score_pairs(url, scorer, 4, 2)
    type(loader._iterator)._get_data = get
    assert not pairs._PAIR_LOCK.locked() and pair_loader(scorer, 4, 2)[1] is not loader
    np.testing.assert_allclose(score_pairs(url, scorer, 4, 2)[3], want, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_metadata_nested_past_the_parser_stack_is_one_bad_row(model_dir, tmp_path, workers):
    from pipeline.curate.scorer import score_pairs
    from pipeline.shards import ShardWriter
    from pipeline.stats import StageStats

    root = str(tmp_path / "src")
    with ShardWriter(root, 0) as w:
        for i in range(4):
            meta = "[" * 200_000 if i == 2 else json.dumps({"sha256": f"s{i}"})
            w.write({"__key__": f"000000{i:06d}", "jpg": jpeg((9, 9, 9 + i)), "txt": "c", "json": meta.encode()})
        w.publish(StageStats(seen=4, kept=4))
    scorer = load_scorer(model_dir, device="cpu")
    rows, _, _, scores = score_pairs(os.path.join(root, "000000.tar"), scorer, 4, workers)
    assert [r["error"] is None for r in rows] == [True, True, False, True]
    assert rows[2]["error"].startswith("bad json metadata") and np.isnan(scores[2])


def test_a_remote_shard_is_fetched_once_for_all_decode_workers(model_dir, tmp_path, s3_bucket):
    import fsspec

    from pipeline.curate.pairs import pair_batches, pair_loader
    from pipeline.curate.scorer import score_pairs

    prefix, options = s3_bucket
    root = str(tmp_path / "src")
    write_dataset(root, [[{"key": f"000000{i:06d}", "jpg": jpeg((9, 99, 199), noise_seed=i), "caption": f"c {i}"}
                          for i in range(10)]])  # fmt: skip
    local = os.path.join(root, "000000.tar")
    data = open(local, "rb").read()
    fs = fsspec.filesystem("s3", **options)
    fs.pipe(f"{prefix}/000000.tar", data)
    fs.pipe(f"{prefix}/000001.tar", data[: len(data) // 2])
    scorer = load_scorer(model_dir, device="cpu")
    want = score_pairs(local, scorer, 4, 0)

    passes = pair_batches(f"{prefix}/000000.tar", scorer, 4, 2, options)
    next(passes)
    read, read_options = pair_loader(scorer, 4, 2)[0].shard()  # what the workers read: one local copy
    assert "://" not in read and os.path.isfile(read) and read_options is None
    passes.close()
    assert not os.path.exists(read)  # removed with the pass
    rows, img, _, scores = score_pairs(f"{prefix}/000000.tar", scorer, 4, 2, options)
    assert [r["key"] for r in rows] == [r["key"] for r in want[0]]
    np.testing.assert_allclose(scores, want[3], atol=1e-5)
    np.testing.assert_allclose(img, want[1], atol=1e-5)
    with pytest.raises(ValueError, match="corrupt or truncated shard") as e:
        score_pairs(f"{prefix}/000001.tar", scorer, 4, 2, options)
    assert str(e.value).startswith(f"{prefix}/000001.tar: ") and "altforge-shard-" not in str(e.value)
