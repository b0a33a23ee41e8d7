"""The CUDA paths: bf16/fp16 training with resume in both trainers, pinned batches, sampling under autocast.

Skipped without CUDA. On a GPU machine: ``pytest -m gpu tests/gpu tests/pipeline/test_latents.py``.
"""

import functools
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_pipeline_folder import make_tiny_parts
from tests.training.test_train_clip import base_cfg as clip_cfg
from tests.training.test_train_ldm import base_cfg as ldm_cfg
from tests.training.test_train_ldm import write_latents
from tests.training.test_train_vae import base_cfg as vae_cfg
from training.data import DataPosition, LoaderConfig, make_loader, make_plan
from training.latent_data import latent_map
from training.models import create_clip, export_open_clip, model_config
from training.models.pipeline import load_pipeline, save_pipeline
from training.models.text import load_text_encoder
from training.sample import generate
from training.synthetic import write_demo_shards
from training.train_clip import train as train_clip
from training.train_ldm import train as train_ldm
from training.train_vae import train as train_vae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-ldm")
    torch.manual_seed(0)
    export_open_clip(create_clip("micro"), model_config("micro"), root / "clip")
    write_latents(root / "lat", 96, load_text_encoder(str(root / "clip"), device="cpu"))
    return root / "lat"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ldm_trains_and_resumes_on_cuda(latents, tmp_path, precision):
    kw = {"device": "cuda", "precision": precision}
    full = train_ldm(ldm_cfg(latents, tmp_path / "full", **kw))
    first = train_ldm(ldm_cfg(latents, tmp_path / "cut", stop_after=3, **kw))
    resumed = train_ldm(ldm_cfg(latents, tmp_path / "cut", **kw))
    assert (first["step"], resumed["step"], full["step"]) == (3, 6, 6)
    losses = [r["loss"] for r in full["train"]]
    assert len(losses) == 6 and all(math.isfinite(x) and x > 0 for x in losses)
    # the same batches, noise and timesteps (drawn on the CPU from the saved position); GPU kernels may differ in
    # the last bits, so the resumed history matches closely rather than bit for bit
    assert [r["loss"] for r in resumed["train"]] == pytest.approx(losses, rel=2e-2)
    a = load_file(str(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff < 2e-2, diff
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in a.values())  # fp32 master weights


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ldm_with_the_text_tower_tuned_on_cuda(latents, tmp_path, precision):
    kw = {"device": "cuda", "precision": precision, "train_text_encoder": True}  # the manifest's tower
    full = train_ldm(ldm_cfg(latents, tmp_path / "full", **kw))
    train_ldm(ldm_cfg(latents, tmp_path / "cut", stop_after=3, **kw))
    resumed = train_ldm(ldm_cfg(latents, tmp_path / "cut", **kw))
    assert resumed["step"] == full["step"] == 6
    losses = [r["loss"] for r in full["train"]]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert [r["loss"] for r in resumed["train"]] == pytest.approx(losses, rel=2e-2)
    ckpts = [tmp_path / d / "checkpoints" / "step_00000006" / "model.safetensors" for d in ("full", "cut")]
    a, b = (load_file(str(c)) for c in ckpts)
    text_keys = [k for k in a if k.startswith(("text.", "ema_text."))]
    assert text_keys and max(float((a[k] - b[k]).abs().max()) for k in text_keys) < 2e-2
    source = load_file(str(latents.parent / "clip" / "open_clip_model.safetensors"))
    assert not torch.allclose(a["text.token_embedding.weight"], source["token_embedding.weight"], atol=1e-4)
    assert all(a[k].dtype == torch.float32 for k in text_keys)  # fp32 master weights under autocast


def test_clip_trains_and_resumes_on_cuda_bf16(tmp_path):
    data = tmp_path / "data"
    write_demo_shards(str(data / "train"), 160, seed=0, size=32, per_shard=40, mismatch_rate=0.2)
    kw = {"device": "cuda", "precision": "bf16", "batch_size": 16}
    full = train_clip(clip_cfg(data, tmp_path / "full", **kw))
    train_clip(clip_cfg(data, tmp_path / "cut", stop_after=3, **kw))
    resumed = train_clip(clip_cfg(data, tmp_path / "cut", **kw))
    assert full["step"] == resumed["step"] == 6
    losses = [r["loss"] for r in full["train"]]
    assert all(math.isfinite(x) for x in losses)
    assert [r["loss"] for r in resumed["train"]] == pytest.approx(losses, rel=2e-2)
    weights = load_file(str(tmp_path / "full" / "open_clip_model.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def test_vae_trains_and_resumes_on_cuda_bf16(tmp_path):
    data = tmp_path / "data"
    write_demo_shards(str(data / "train"), 160, seed=0, size=32, per_shard=40)
    write_demo_shards(str(data / "eval"), 48, seed=1, size=32, per_shard=48)
    kw = {"device": "cuda", "precision": "bf16"}
    full = train_vae(vae_cfg(data, tmp_path / "full", **kw))
    train_vae(vae_cfg(data, tmp_path / "cut", stop_after=3, **kw))
    resumed = train_vae(vae_cfg(data, tmp_path / "cut", **kw))  # channels_last weights, restored AdamW moments
    assert full["step"] == resumed["step"] == 6
    losses = [r["loss"] for r in full["train"]]
    assert all(math.isfinite(x) for x in losses)
    assert [r["loss"] for r in resumed["train"]] == pytest.approx(losses, rel=2e-2)
    assert resumed["scaling_factor"] == pytest.approx(full["scaling_factor"], rel=2e-2)


def test_loader_batches_arrive_pinned(latents):
    cfg = LoaderConfig(batch_size=8, workers=2, shuffle_buffer=16)
    plan = make_plan(str(latents), cfg, world_size=1)
    map_fn = functools.partial(latent_map, scale=None, text=True, offset=0.0, flip_p=0.0)
    batch = next(iter(make_loader(plan, cfg, 0, map_fn, DataPosition())))
    assert batch["latent"].shape == (8, 4, 8, 8)
    assert batch["latent"].is_pinned() and batch["text_emb"].is_pinned()  # host-to-device copies can overlap
    moved = batch["latent"].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(moved.cpu(), batch["latent"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-pipe")
    unet, vae, clip_dir = make_tiny_parts(tmp, seed=3)
    save_pipeline(tmp / "model", unet, vae, clip_dir, None, "epsilon", {"note": "random"})
    return tmp / "model"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_sampling_on_cuda_is_seeded_and_agrees_with_the_cpu(model_dir, precision):
    prompts, kw = ["a red circle", "a blue star"], {"steps": 8, "guidance": 5.0, "seed": 7, "n": 2}
    cpu = generate(load_pipeline(model_dir, "cpu"), prompts, **kw)
    pipe = load_pipeline(model_dir, "cuda")
    assert pipe.device.type == "cuda"
    a = generate(pipe, prompts, precision=precision, batch_size=4, **kw)
    b = generate(pipe, prompts, precision=precision, batch_size=4, **kw)
    assert a.shape == cpu.shape == (4, 3, 32, 32) and a.device.type == "cpu"
    assert torch.equal(a, b)  # the same seed gives the same image
    other = generate(pipe, prompts, precision=precision, batch_size=4, **{**kw, "seed": 8})
    assert float((a.int() - other.int()).abs().float().mean()) > 5
    gap = float((a.int() - cpu.int()).abs().float().mean())  # 0..255 units
    assert gap < (1.0 if precision == "fp32" else 8.0), gap  # TF32 convolutions; half-precision activations
    neg = generate(pipe, prompts, negative="red", precision=precision, batch_size=4, **kw)
    assert not torch.equal(neg, a)


def test_half_weights_load_and_sample(model_dir):
    pipe = load_pipeline(model_dir, "cuda", torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16
    images = generate(pipe, ["a green square"], steps=4, guidance=7.5, seed=49)
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.uint8 and images.float().std() > 0


@pytest.fixture(scope="module")
def curate_source(tmp_path_factory):
    from tests.pipeline.curate.helpers import jpeg, make_tiny_clip, write_dataset

    root = tmp_path_factory.mktemp("gpu-curate")
    cols = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    captions = ["a red square", "a green square", "a blue square", "something else"]
    samples = [
        {"key": f"000000{i:06d}", "jpg": jpeg(cols[i % 3], noise_seed=i), "caption": captions[i % 4]}
        for i in range(40)
    ]
    samples.append({"key": "000000000040", "jpg": b"not an image", "caption": "a broken one"})
    write_dataset(str(root / "src"), [samples])
    return make_tiny_clip(str(root / "clip")), str(root / "src" / "000000.tar")


def test_curation_scores_on_cuda_agree_with_the_cpu(curate_source):
    from pipeline.curate.pairs import pair_batches
    from pipeline.curate.scorer import load_scorer, score_pairs

    model, shard = curate_source
    cpu_rows, cpu_img, _, cpu_scores = score_pairs(shard, load_scorer(model, device="cpu"), 8, 0)
    gpu = load_scorer(model, device="cuda")
    assert gpu.device.type == "cuda"
    batch = next(iter(pair_batches(shard, gpu, 8, 2)))  # decoded in 2 workers, pinned for the copy
    assert batch.images.is_pinned() and batch.images.shape[1:] == (3, 32, 32)
    rows, img, _, scores = score_pairs(shard, gpu, 8, 2)  # bf16 autocast
    assert [r["key"] for r in rows] == [r["key"] for r in cpu_rows] and len(rows) == 41
    assert np.isnan(scores[-1]) and rows[-1]["error"] and np.isnan(cpu_scores[-1])  # the undecodable image
    np.testing.assert_allclose(scores[:-1], cpu_scores[:-1], atol=3e-2)
    cos = (img[:-1] * cpu_img[:-1]).sum(1)
    assert cos.min() > 0.99, cos.min()
    assert np.isfinite(scores[:-1]).all()
