"""encode_flow under a real (test-harness) Prefect server, and the torchrun entry with two CPU processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import shards
from pipeline.images import prepare_image
from pipeline.latent_images import to_model_input
from pipeline.latents import EncodeConfig, latent_info, read_empty_embedding
from tests.conftest import in_netns, without_torch_warnings
from tests.pipeline.test_latents import SCALE, tiny_vae
from training.synthetic import write_demo_shards

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from training.models import create_clip, export_open_clip, model_config

    root = tmp_path_factory.mktemp("encode")
    src = str(root / "src")
    write_demo_shards(src, 10, seed=3, size=40, per_shard=5)
    tiny_vae().save_pretrained(str(root / "vae"), safe_serialization=True)
    torch.manual_seed(1)
    export_open_clip(create_clip("micro"), model_config("micro"), root / "clip")
    return root, src, str(root / "vae"), str(root / "clip")


def test_encode_flow_end_to_end_with_artifacts_and_resume(harness, data):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.encode import run_encode
    from pipeline.manifest import read_manifest
    from training.models.text import load_text_encoder
    from training.models.vae import decode_latents, encode_posterior, load_vae, psnr, reconstruct

    root, src, vae_dir, clip_dir = data
    dst = str(root / "lat")
    cfg = EncodeConfig(resolution=32, latent_mode="mean_logvar", flip=True, batch_size=4)
    m = run_encode(src, dst, vae_dir, clip_dir, cfg=cfg, device="cpu")
    assert m["stage"] == "encode" and m["parent"] == f"{src}/manifest.json"
    assert read_manifest(dst)["samples"] == m["samples"] == m["stats"]["kept"] == 10
    assert [s["name"] for s in m["shards"]] == ["000000.tar", "000001.tar"]
    c = latent_info(dst)
    assert c["vae"]["ref"] == vae_dir and len(c["vae"]["sha256"]) == 64 and c["scaling_factor"] == pytest.approx(SCALE)
    assert c["latent_shape"] == [4, 8, 8] and c["compute_dtype"] == "float32" and c["dtype"] == "bfloat16"
    assert c["latent_mode"] == "mean_logvar" and c["flip"] is True and c["resolution"] == 32
    assert c["text_encoder"]["model"] == "local-dir:" + os.path.abspath(clip_dir)
    assert c["text_encoder"]["context_length"] == 16 and len(c["text_encoder"]["sha256"]) == 64

    # the flow's models are wired right: the stored arrays equal the models' outputs computed directly
    vae, text = load_vae(vae_dir), load_text_encoder(clip_dir, device="cpu")
    raw = next(shards.iter_samples(f"{src}/000001.tar", decode=False))
    got = next(shards.iter_samples(f"{dst}/000001.tar"))
    assert got["__key__"] == raw["__key__"] and got["txt"] == raw["txt"].decode()
    arr, info = prepare_image(raw["jpg"], 32)
    with torch.inference_mode():
        mean, logvar = encode_posterior(vae, to_model_input(torch.from_numpy(arr)[None]))
        emb = text.encode([got["txt"]])[0].numpy()
    assert np.allclose(got["latent.npy"], mean[0].numpy() * SCALE, rtol=2e-3, atol=2e-4)
    assert np.allclose(got["logvar.npy"], logvar[0].numpy(), rtol=2e-3, atol=2e-3)
    assert np.allclose(got["text_emb.npy"], emb, rtol=2e-3, atol=2e-3)
    assert got["json"]["crop"] == info["crop"] and "attributes" in got["json"]  # the source metadata is kept
    # decoding the stored (scaled, float16) latent gives the VAE's own reconstruction of the cropped image
    with torch.inference_mode():
        stored = decode_latents(vae, torch.from_numpy(got["latent.npy"].astype(np.float32))[None])
        direct = reconstruct(vae, to_model_input(torch.from_numpy(arr)[None]))
    assert psnr(stored, direct) > 40.0
    assert np.allclose(read_empty_embedding(dst), text.empty().numpy(), rtol=2e-3, atol=2e-3)

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["encode-funnel", "encode-summary"]))
        )
    kinds = {a.key: a for a in arts}
    assert set(kinds) == {"encode-funnel", "encode-summary"}
    assert "latents written" in str(kinds["encode-funnel"].data) and "scaling factor" in kinds["encode-summary"].data

    # a rerun skips the finished shards and writes the same manifest
    stat = os.stat(f"{dst}/000000.tar")
    m2 = run_encode(src, dst, vae_dir, clip_dir, cfg=cfg, device="cpu")
    after = os.stat(f"{dst}/000000.tar")
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]


def test_bad_model_fails_with_one_line(harness, data, capsys):
    from flows.encode import main

    root, src, vae_dir, clip_dir = data
    code = main([src, "--out", str(root / "bad"), "--vae", src, "--text-encoder", clip_dir, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "not a diffusers AutoencoderKL folder" in err[0]
    assert not shards.done_shards(str(root / "bad"))
    # an output that cannot be written (a file where the folder should be): one line too, not a traceback
    (root / "file").write_text("x")
    code = main(
        [src, "--out", str(root / "file" / "lat"), "--vae", vae_dir, "--text-encoder", clip_dir, "--device", "cpu"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err


def test_assign_shards_is_balanced_and_explicit():
    from flows.encode import assign_shards

    names = [f"{i:06d}" for i in (5, 1, 9, 3, 7)]
    got = assign_shards(names, 2)
    assert got == [["000001", "000003", "000005"], ["000007", "000009"]]
    assert assign_shards(names[:1], 3) == [["000005"], [], []]


def test_encode_config_from_a_recipe_section_and_overrides():
    from flows.encode import encode_config
    from pipeline.recipe import EncodeSection

    section = EncodeSection(vae="v", text_encoder={"model": "micro"}, resolution=32, flip=True, batch_size=8)
    cfg = encode_config(section, batch_size=16, latent_mode=None)
    assert cfg == EncodeConfig(resolution=32, flip=True, batch_size=16)
    assert encode_config(resolution=64) == EncodeConfig(resolution=64)
    tuned = EncodeSection(vae="v", text_encoder={"model": "micro"}, workers=2, min_size=16, device="cpu")
    assert encode_config(tuned) == EncodeConfig(workers=2, min_size=16)


def test_encode_fingerprint_ignores_workers_and_unset_new_fields():
    from flows.stages import encode_identity
    from pipeline.recipe import EncodeSection

    base = EncodeSection(vae="v", text_encoder={"model": "micro"}, resolution=32)
    # what the fingerprint hashed before min_size, workers and device were recipe settings
    assert encode_identity(base) == {
        "vae": "v", "text_encoder": {"model": "micro", "pretrained": None}, "resolution": 32, "latent_mode": "mean",
        "store_text_embeddings": True, "flip": False, "dtype": "bfloat16", "batch_size": 64,
    }  # fmt: skip
    assert encode_identity(base.model_copy(update={"workers": 4})) == encode_identity(base)
    assert encode_identity(base.model_copy(update={"min_size": 16}))["min_size"] == 16
    assert encode_identity(base.model_copy(update={"device": "cpu"}))["device"] == "cpu"


@pytest.mark.slow  # two processes importing torch, diffusers and open_clip: ~15 s on a quiet 2-core machine
def test_torchrun_ranks_take_their_own_shards(data):
    root, src, vae_dir, clip_dir = data
    dst = str(root / "ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "flows.encode",
           src, "--out", dst, "--vae", vae_dir, "--text-encoder", clip_dir, "--device", "cpu", "--resolution", "32",
           "--no-text-embeddings"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": "lo"}
    p = subprocess.run(in_netns(cmd), capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    outs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert sorted(o["rank"] for o in outs) == [0, 1]
    assert sorted(n for o in outs for n in o["shards"]) == ["000000", "000001"]
    assert all(len(o["shards"]) == 1 for o in outs) and any(o["wrote_manifest"] for o in outs)
    m = json.load(open(os.path.join(dst, "manifest.json")))
    assert m["samples"] == 10 and m["config"]["store_text_embeddings"] is False
    assert read_empty_embedding(dst).shape == (16, 32)
    assert all("text_emb.npy" not in s for s in shards.iter_samples(f"{dst}/000000.tar"))
    # the same --out at another resolution: rank 0 refuses in one line, the other rank leaves quietly, and the
    # launcher's report is one line too (no torchrun traceback, no rank dying on a closed connection)
    cmd = [sys.executable, "-m", "flows.cli", "encode", "--nproc-per-node", "2", src, "--out", dst, "--vae", vae_dir,
           "--text-encoder", clip_dir, "--device", "cpu", "--resolution", "16", "--no-text-embeddings"]  # fmt: skip
    p = subprocess.run(in_netns(cmd), capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    err = without_torch_warnings(p.stderr)  # c10d's warning that it cannot name a peer in the namespace is torch's
    assert p.returncode != 0 and "Traceback" not in p.stderr and "gloo" not in p.stderr.lower(), p.stderr[-3000:]
    assert err[0].startswith("error: ") and "other settings" in err[0] and len(err) == 2, err
