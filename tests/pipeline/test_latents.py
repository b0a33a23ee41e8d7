"""The latent stage: shard contents against the models run directly, modes, drops, the empty prompt, resume, kills.

What an output folder accepts on a rerun (models, settings, source, the empty embedding) is in test_latents_folder.py.
"""

import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import shards
from pipeline.images import prepare_image
from pipeline.latent_images import to_model_input
from pipeline.latents import (
    ENCODE_CONFIG,
    EncodeConfig,
    Encoders,
    encode_dataset,
    encode_latents_shard,
    latent_config,
    latent_info,
    latent_shards,
    read_empty_embedding,
)
from pipeline.manifest import build_manifest, write_manifest
from pipeline.stats import StageStats
from tests.pipeline.curate.helpers import jpeg, write_dataset

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALE = 0.37  # not 1.0, so a missing multiplication shows


def tiny_vae():
    """A randomly initialised tiny AutoencoderKL: 32x32 images -> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=SCALE,
    )
    return vae.eval().to(memory_format=torch.channels_last)


def posterior(vae, x):
    """Unscaled posterior mean and log-variance."""
    d = vae.encode(x).latent_dist
    return d.mean, d.logvar


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from training.models import create_clip, export_open_clip, model_config
    from training.models.text import load_text_encoder

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    export_open_clip(create_clip("micro"), model_config("micro"), root / "clip")
    text = load_text_encoder(str(root / "clip"), device="cpu")
    return tiny_vae(), text


def encoders(models, texts=True) -> Encoders:
    vae, text = models
    return Encoders(functools.partial(posterior, vae), text.encode if texts else None, SCALE)


def sample(key: str, size=(40, 40), rgb=(200, 40, 40), seed=0, caption=None) -> dict:
    return {"key": key, "jpg": jpeg(rgb, size, noise_seed=seed), "caption": caption or f"a tile {key}"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source(tmp_path_factory.mktemp("src"))


def write_source(root) -> str:
    """A curated source of two shards (7 and 5 JPEGs of several sizes) with its manifest; returns its path."""
    sizes = [(40, 40), (48, 32), (30, 52), (64, 40), (32, 32)]
    s0 = [sample(f"a{i:04d}", sizes[i % 5], (40 * i % 255, 90, 200), seed=i) for i in range(7)]
    s1 = [sample(f"b{i:04d}", sizes[(i + 2) % 5], (90, 30 * i % 255, 60), seed=50 + i) for i in range(5)]
    src = str(root / "src")
    write_dataset(src, [s0, s1])
    write_manifest(src, build_manifest(src, "curate", {}))
    return src


def reference(models, img_bytes: bytes, resolution: int, flip=False):
    """Latent (mean x scale), logvar and crop info of one image, computed directly."""
    vae, _ = models
    arr, info = prepare_image(img_bytes, resolution)
    x = to_model_input(torch.from_numpy(arr)[None])
    if flip:
        x = x.flip(3)
    with torch.inference_mode():
        mean, logvar = posterior(vae, x)
    return (mean[0] * SCALE).numpy(), logvar[0].numpy(), info


def test_prepare_image_resizes_shorter_side_and_center_crops():
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, 30:] = 255  # right half white
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    out, info = prepare_image(buf.getvalue(), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert info == {"crop": [8, 0, 24, 16], "source_size": [60, 30], "resolution": 16}
    want = np.asarray(Image.fromarray(arr).resize((32, 16), Image.Resampling.BICUBIC).crop((8, 0, 24, 16)))
    assert np.array_equal(out, want)
    assert out[:, 0].max() < 40 and out[:, -1].min() > 215  # the crop keeps the boundary in the middle

    tall = Image.fromarray(np.full((52, 30, 3), 7, np.uint8))
    buf = io.BytesIO()
    tall.save(buf, "PNG")
    out, info = prepare_image(buf.getvalue(), 30)  # no resize: only the crop
    assert info["crop"] == [0, 11, 30, 41] and out.shape == (30, 30, 3) and (out == 7).all()
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError
        prepare_image(b"not an image", 16)


def test_to_model_input_range_layout_and_dtype():
    u8 = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8).expand(2, 4, 4, 3).contiguous()
    x = to_model_input(u8, "cpu", torch.bfloat16)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x[0, 0].eq(-1).all() and x[0, 1].eq(1).all()
    assert abs(float(to_model_input(u8)[0, 2, 0, 0]) - (128 / 127.5 - 1)) < 1e-7


def test_latent_shard_holds_scaled_means_and_the_encoders_text_states(models, source, tmp_path):
    cfg = EncodeConfig(resolution=32, batch_size=3, dtype="float32")
    stats = encode_latents_shard(f"{source}/000000.tar", str(tmp_path / "000000.tar"), cfg, encoders(models))
    assert (stats.seen, stats.kept, stats.n_dropped) == (7, 7, 0)
    assert shards.done_shards(str(tmp_path)) == ["000000"]
    src = {s["__key__"]: s for s in shards.iter_samples(f"{source}/000000.tar", decode=False)}
    got = list(shards.iter_samples(str(tmp_path / "000000.tar")))
    assert [s["__key__"] for s in got] == sorted(src)
    _, text = models
    want_text = text.encode([s["txt"] for s in got]).numpy()
    for s, t in zip(got, want_text, strict=True):
        assert set(s) == {"__key__", "__url__", "latent.npy", "text_emb.npy", "txt", "json"}
        lat, emb = s["latent.npy"], s["text_emb.npy"]
        assert lat.dtype == np.float16 and lat.shape == (4, 8, 8)
        assert emb.dtype == np.float16 and emb.shape == (text.context_length, text.width) == (16, 32)
        mean, _, info = reference(models, src[s["__key__"]]["jpg"], 32)
        assert np.allclose(lat.astype(np.float32), mean, rtol=2e-3, atol=2e-4), s["__key__"]
        assert np.abs(mean).max() > 1e-3  # not a trivially zero latent
        assert np.allclose(emb.astype(np.float32), t, rtol=2e-3, atol=2e-3)
        source_meta = json.loads(src[s["__key__"]]["json"])
        assert s["json"] == {**source_meta, **info} and s["json"]["crop"] == info["crop"]
        assert s["txt"] == src[s["__key__"]]["txt"].decode()
    crops = {s["__key__"]: s["json"]["crop"] for s in got}
    assert crops["a0001"] == [8, 0, 40, 32] and crops["a0002"] == [0, 11, 32, 43]  # 48x32 and 30x52 sources
    df = shards.read_parquet(str(tmp_path))
    assert len(df) == 7 and set(df.status) == {"success"} and set(df.width) == {32}
    assert json.loads(df.set_index("key").loc["a0001", "crop"]) == [8, 0, 40, 32]

    # Decoding in DataLoader workers gives the same shard contents
    par = tmp_path / "par"
    cfg2 = EncodeConfig(resolution=32, batch_size=2, dtype="float32", workers=2)
    encode_latents_shard(f"{source}/000000.tar", str(par / "000000.tar"), cfg2, encoders(models))
    again = list(shards.iter_samples(str(par / "000000.tar")))
    assert [s["__key__"] for s in again] == [s["__key__"] for s in got]
    for a, b in zip(again, got, strict=True):
        assert np.allclose(a["latent.npy"], b["latent.npy"], atol=1e-3) and a["json"] == b["json"]


def test_mean_logvar_and_flip_modes(models, source, tmp_path):
    cfg = EncodeConfig(resolution=32, latent_mode="mean_logvar", flip=True, store_text_embeddings=False)
    encode_latents_shard(f"{source}/000001.tar", str(tmp_path / "000001.tar"), cfg, encoders(models, texts=False))
    src = {s["__key__"]: s for s in shards.iter_samples(f"{source}/000001.tar", decode=False)}
    got = list(shards.iter_samples(str(tmp_path / "000001.tar")))
    assert len(got) == 5
    for s in got:
        exts = {"latent.npy", "logvar.npy", "latent_flip.npy", "logvar_flip.npy", "txt", "json"}
        assert set(s) - {"__key__", "__url__"} == exts
        mean, logvar, _ = reference(models, src[s["__key__"]]["jpg"], 32)
        fmean, flogvar, _ = reference(models, src[s["__key__"]]["jpg"], 32, flip=True)
        assert all(s[e].dtype == np.float16 and s[e].shape == (4, 8, 8) for e in exts if e.endswith("npy"))
        assert np.allclose(s["latent.npy"], mean, rtol=2e-3, atol=2e-4)
        assert np.allclose(s["logvar.npy"], logvar, rtol=2e-3, atol=2e-3)
        assert np.allclose(s["latent_flip.npy"], fmean, rtol=2e-3, atol=2e-4)
        assert np.allclose(s["logvar_flip.npy"], flogvar, rtol=2e-3, atol=2e-3)
        assert not np.allclose(s["latent_flip.npy"], s["latent.npy"], atol=1e-3)  # the flip did change the input


def test_broken_images_and_missing_captions_are_counted_with_a_reason(models, tmp_path):
    good = [sample(f"k{i:03d}", seed=i) for i in range(3)]
    broken = {"key": "k100", "jpg": jpeg((1, 2, 3))[:60], "caption": "a truncated jpeg"}
    small = sample("k101", size=(12, 20))
    src = write_dataset(str(tmp_path / "src"), [[*good, broken, small]])
    with shards.ShardWriter(str(tmp_path / "src"), 1) as w:  # samples without a caption / without an image
        w.write({"__key__": "k200", "jpg": jpeg((5, 5, 5)), "json": {}})
        w.write({"__key__": "k201", "txt": "no image here", "json": {}})
        w.write({"__key__": "k202", "jpg": jpeg((9, 9, 9)), "txt": "   ", "json": {}})
        w.publish(StageStats(seen=3, kept=3))
    cfg = EncodeConfig(resolution=32, store_text_embeddings=False, min_size=16)
    enc = encoders(models, texts=False)
    st = encode_latents_shard(f"{src}/000000.tar", str(tmp_path / "out" / "000000.tar"), cfg, enc)
    assert (st.seen, st.kept, dict(st.dropped)) == (5, 3, {"decode_error": 1, "image_too_small": 1})
    st1 = encode_latents_shard(f"{src}/000001.tar", str(tmp_path / "out" / "000001.tar"), cfg, enc)
    assert (st1.seen, st1.kept, dict(st1.dropped)) == (3, 0, {"missing_caption": 2, "missing_image": 1})
    df = shards.read_parquet(str(tmp_path / "out")).set_index("key")
    assert len(df) == 8 and df.loc["k100", "status"] == "decode_error" and df.loc["k100", "error"]
    assert df.loc["k101", "status"] == "image_too_small" and df.loc["k101", "original_width"] == 12
    assert df.loc["k201", "status"] == "missing_image" and df.loc["k202", "status"] == "missing_caption"
    keys = [s["__key__"] for s in shards.iter_samples(str(tmp_path / "out" / "000000.tar"))]
    assert keys == ["k000", "k001", "k002"]
    assert shards.read_shard_stats(str(tmp_path / "out"), "000000")["dropped"] == {
        "decode_error": 1,
        "image_too_small": 1,
    }


def test_nonfinite_latents_are_dropped(models, source, tmp_path):
    def overflowing(x):
        mean = torch.zeros(x.shape[0], 4, 8, 8)
        if x.shape[0] > 1:
            mean[1] = float("inf")  # what an fp16 VAE that overflows returns
        return mean, torch.zeros_like(mean)

    cfg = EncodeConfig(resolution=32, store_text_embeddings=False, batch_size=2)
    st = encode_latents_shard(
        f"{source}/000001.tar", str(tmp_path / "000001.tar"), cfg, Encoders(overflowing, None, 1)
    )
    assert (st.seen, st.kept, dict(st.dropped)) == (5, 3, {"nonfinite_latent": 2})  # item 1 of the two full batches
    assert len(list(shards.iter_samples(str(tmp_path / "000001.tar")))) == 3


def _config(models, cfg: EncodeConfig) -> dict:
    _, text = models
    vae = {"ref": "tiny", "sha256": None, "scaling_factor": SCALE, "latent_channels": 4, "downsample": 4}
    return latent_config(cfg, vae, {**text.provenance, "context_length": 16, "width": 32}, "float32")


def test_dataset_manifest_empty_embedding_and_resume(models, source, tmp_path):
    _, text = models
    dst = str(tmp_path / "lat")
    cfg = EncodeConfig(resolution=32, store_text_embeddings=False)
    m = encode_dataset(source, dst, cfg, encoders(models, texts=False), _config(models, cfg), text.empty())
    assert m["stage"] == "encode" and m["parent"] == f"{source}/manifest.json"
    assert m["samples"] == m["stats"]["kept"] == 12 and [s["name"] for s in m["shards"]] == [
        "000000.tar",
        "000001.tar",
    ]
    info = latent_info(dst)
    assert info == m["config"] and info["latent_shape"] == [4, 8, 8] and info["scaling_factor"] == SCALE
    assert info["latent_mode"] == "mean" and info["flip"] is False and info["store_text_embeddings"] is False
    assert info["compute_dtype"] == "float32" and info["latent_dtype"] == "float16" and info["resolution"] == 32
    assert info["text_encoder"]["width"] == 32 and info["text_encoder"]["model"].startswith("local-dir:")
    empty = read_empty_embedding(dst)
    assert empty.dtype == np.float16 and empty.shape == (16, 32)
    assert np.allclose(empty.astype(np.float32), text.encode([""])[0].numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(empty.astype(np.float32), text.encode(["a tile"])[0].numpy(), atol=1e-2)
    assert all("text_emb.npy" not in s for s in shards.iter_samples(f"{dst}/000000.tar"))

    # a finished shard is skipped; one without its done marker is redone
    stat0 = os.stat(f"{dst}/000000.tar")
    before1 = open(f"{dst}/000001.tar", "rb").read()
    os.remove(f"{dst}/000001_stats.json")
    m2 = encode_dataset(source, dst, cfg, encoders(models, texts=False), _config(models, cfg), text.empty())
    after0 = os.stat(f"{dst}/000000.tar")
    assert (after0.st_ino, after0.st_mtime_ns) == (stat0.st_ino, stat0.st_mtime_ns)
    assert open(f"{dst}/000001.tar", "rb").read() == before1 and m2["samples"] == 12

    # other settings never mix into the same dataset
    other = EncodeConfig(resolution=16, store_text_embeddings=False)
    with pytest.raises(ValueError, match="resolution"):
        encode_dataset(source, dst, other, encoders(models, texts=False), _config(models, other), text.empty())
    assert json.load(open(f"{dst}/{ENCODE_CONFIG}"))["resolution"] == 32
    faster = EncodeConfig(resolution=32, store_text_embeddings=False, batch_size=5)  # run-only settings may change
    encode_dataset(source, dst, faster, encoders(models, texts=False), _config(models, faster), text.empty())


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    import torch
    from pipeline.latents import EncodeConfig, Encoders, encode_latents_shard

    def slow(x):
        print("batch", flush=True)
        time.sleep(0.3)
        mean = torch.nn.functional.avg_pool2d(x.float(), 4).mean(1, keepdim=True).expand(-1, 4, -1, -1)
        return mean, torch.zeros_like(mean)

    cfg = EncodeConfig(resolution=32, store_text_embeddings=False, batch_size=2)
    encode_latents_shard(sys.argv[1], sys.argv[2], cfg, Encoders(slow, None, 1.0))
    print("done", flush=True)
    """
)


def test_sigkill_mid_shard_leaves_no_visible_shard(source, tmp_path):
    script = tmp_path / "encode.py"
    script.write_text(KILL_SCRIPT.format(root=ROOT))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), f"{source}/000000.tar", str(out / "000000.tar")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "batch"
    assert proc.stdout.readline().strip() == "batch"  # the first batch is in the (temporary) tar
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert shards.done_shards(str(out)) == []
    assert [f for f in os.listdir(out) if f.startswith(shards.TMP_PREFIX)]  # it was killed mid-shard
    assert not [f for f in os.listdir(out) if not f.startswith(shards.TMP_PREFIX)]

    def mean_only(x):
        mean = torch.nn.functional.avg_pool2d(x.float(), 4).mean(1, keepdim=True).expand(-1, 4, -1, -1)
        return mean, torch.zeros_like(mean)

    assert shards.clean_temporaries(str(out)) >= 1
    cfg = EncodeConfig(resolution=32, store_text_embeddings=False, batch_size=2)
    st = encode_latents_shard(f"{source}/000000.tar", str(out / "000000.tar"), cfg, Encoders(mean_only, None, 1.0))
    assert st.kept == 7 and shards.done_shards(str(out)) == ["000000"]
    assert len(list(shards.iter_samples(str(out / "000000.tar")))) == 7


def test_object_store_source_and_output(models, source, s3_bucket):
    prefix, opts = s3_bucket
    src_url, dst = f"{prefix}/src/000001.tar", f"{prefix}/lat"
    from pipeline import storage

    storage.write_bytes(src_url, open(f"{source}/000001.tar", "rb").read(), opts)
    cfg = EncodeConfig(resolution=32, batch_size=4)
    st = encode_latents_shard(src_url, f"{dst}/000001.tar", cfg, encoders(models), storage_options=opts)
    assert st.kept == 5 and shards.done_shards(dst, opts) == ["000001"]
    got = list(shards.iter_samples(f"{dst}/000001.tar", storage_options=opts))
    assert len(got) == 5 and got[0]["latent.npy"].shape == (4, 8, 8) and got[0]["text_emb.npy"].shape == (16, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_gpu_with_pinned_decode_workers_matches_fp32(models, source, tmp_path):
    gpu = tiny_vae().to("cuda", torch.bfloat16, memory_format=torch.channels_last)
    enc = Encoders(functools.partial(posterior, gpu), None, SCALE, device="cuda", dtype="bfloat16")
    cfg = EncodeConfig(resolution=32, store_text_embeddings=False, batch_size=4, workers=2)
    st = encode_latents_shard(f"{source}/000000.tar", str(tmp_path / "000000.tar"), cfg, enc)
    assert st.kept == 7
    src = {s["__key__"]: s for s in shards.iter_samples(f"{source}/000000.tar", decode=False)}
    for s in shards.iter_samples(str(tmp_path / "000000.tar")):
        mean, _, _ = reference(models, src[s["__key__"]]["jpg"], 32)
        assert s["latent.npy"].dtype == np.float16
        assert np.allclose(s["latent.npy"], mean, rtol=5e-2, atol=2e-2)  # bf16 weights and activations


def test_an_elongated_image_is_resampled_only_where_it_is_cropped(monkeypatch):
    arr = np.zeros((4000, 2, 3), np.uint8)
    arr[:, 1] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda im, sz, *a, **kw: sizes.append(sz) or resize(im, sz, *a, **kw))
    out, info = prepare_image(buf.getvalue(), 64)  # resizing all of it first would allocate 64 x 128,000 pixels
    assert sizes == [(64, 64)] and out.shape == (64, 64, 3) and info["crop"] == [0, 63968, 64, 64032]
    want = np.asarray(Image.fromarray(arr).resize((64, 128000), Image.Resampling.BICUBIC).crop(tuple(info["crop"])))
    assert np.abs(out.astype(int) - want).max() <= 1  # the same pixels as resizing the whole and cropping


def test_a_corrupt_source_shard_is_one_line_naming_it(models, source, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(source, src)
    tar = os.path.join(src, "000000.tar")
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2)
    for workers in (0, 1):
        cfg = EncodeConfig(resolution=32, store_text_embeddings=False, workers=workers, batch_size=2)
        with pytest.raises(ValueError) as err:
            encode_latents_shard(tar, str(tmp_path / f"out{workers}" / "000000.tar"), cfg, encoders(models, False))
        line = str(err.value)
        assert line.startswith(f"{tar}: cannot read the source shard: ") and "\n" not in line, line
        assert "DataLoader" not in line  # the worker's own error, not the loader's wrapper
        assert not os.path.exists(tmp_path / f"out{workers}" / "000000.tar")


def test_keys_that_cannot_be_written_are_counted_not_fatal(models, tmp_path):
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "000000.tar", "w") as tar:  # a tar this project did not write
        for name, data in [("a.jpg", jpeg((1, 2, 3))), ("a.txt", b"one"), ("b.jpg", jpeg((4, 5, 6))),
                           ("b.txt", b"two"), ("a.jpg", jpeg((7, 8, 9))), ("a.txt", b"again")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = EncodeConfig(resolution=32, store_text_embeddings=False)
    out = str(tmp_path / "out" / "000000.tar")
    st = encode_latents_shard(str(src / "000000.tar"), out, cfg, encoders(models, False))
    assert (st.seen, st.kept, dict(st.dropped)) == (3, 2, {"duplicate_key": 1})
    assert [s["__key__"] for s in shards.iter_samples(out)] == ["a", "b"]


def test_a_key_in_two_source_shards_is_written_once_whatever_the_shard_order(models, tmp_path):
    from pipeline.latents import prepare_latents, source_record

    cfg, enc = EncodeConfig(resolution=32, store_text_embeddings=False), encoders(models, texts=False)
    first, second = [sample("a0000"), sample("k0001", seed=1)], [sample("k0001", seed=2), sample("z0000", seed=3)]
    src, dst = write_dataset(str(tmp_path / "src"), [first, second]), str(tmp_path / "lat")
    m = encode_dataset(src, dst, cfg, enc, _config(models, cfg), np.zeros((4, 8), np.float32))
    assert m["samples"] == 3 and m["stats"]["dropped"] == {"duplicate_key": 1}
    assert [s["__key__"] for u in shards.shard_urls(dst) for s in shards.iter_samples(u, decode=False)] == [
        "a0000", "k0001", "z0000"
    ]  # fmt: skip
    rows = shards.read_parquet(f"{dst}/000001.tar").set_index("key")
    assert rows.loc["k0001", "status"] == "duplicate_key" and "earlier source shard" in rows.loc["k0001", "error"]

    raw = tmp_path / "raw"  # tars alone (keys from their headers), encoded last shard first as a worker might
    raw.mkdir()
    for n in ("000000", "000001"):
        shutil.copy(f"{src}/{n}.tar", raw / f"{n}.tar")
    plan = latent_shards(f"{raw}/{{000000..000001}}.tar")
    out = tmp_path / "lat2"
    prepare_latents(str(out), _config(models, cfg), np.zeros((4, 8), np.float32), source=source_record(plan))
    late = encode_latents_shard(plan["000001"], str(out / "000001.tar"), cfg, enc)
    early = encode_latents_shard(plan["000000"], str(out / "000000.tar"), cfg, enc)
    assert (late.kept, dict(late.dropped), early.kept, dict(early.dropped)) == (1, {"duplicate_key": 1}, 2, {})
