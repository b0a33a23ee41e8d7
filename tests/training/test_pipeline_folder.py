"""The pipeline folder: save, load, same outputs; model_index.json; the parts load in their own ecosystems."""

import json
import logging

import numpy as np
import open_clip
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from training.models import create_clip, export_open_clip, model_config
from training.models.pipeline import LdmPipeline, default_scheduler_config, load_pipeline, save_pipeline
from training.models.text import load_text_encoder
from training.models.unet import build_unet
from training.models.vae import build_vae
from training.sample import generate

torch.set_num_threads(1)


def make_tiny_parts(tmp_path, seed: int = 0):
    """A random micro CLIP export, the tiny U-Net (cross-attention width 32) and the tiny VAE (32 px <-> 8x8x4)."""
    torch.manual_seed(seed)
    clip_dir = tmp_path / "clip"
    export_open_clip(create_clip("micro"), model_config("micro"), clip_dir)
    unet = build_unet("tiny", cross_attention_dim=32, sample_size=8).eval()
    vae = build_vae("tiny").eval()
    return unet, vae, clip_dir


def make_tiny_pipeline(tmp_path, prediction_type: str = "epsilon", seed: int = 0) -> LdmPipeline:
    """Save a random tiny pipeline folder under ``tmp_path/model`` and load it back."""
    unet, vae, clip_dir = make_tiny_parts(tmp_path, seed)
    save_pipeline(tmp_path / "model", unet, vae, clip_dir, None, prediction_type, {"note": "random"})
    return load_pipeline(tmp_path / "model")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    unet, vae, clip_dir = make_tiny_parts(tmp)
    lineage = {"data": "lat/manifest.json", "step": 3}
    sched = default_scheduler_config("v_prediction")
    save_pipeline(tmp / "model", unet, vae, clip_dir, sched, "v_prediction", lineage)
    return {"dir": tmp / "model", "unet": unet, "vae": vae, "clip": clip_dir, "lineage": lineage}


def test_folder_layout_and_model_index(saved):
    out = saved["dir"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "AltforgeLatentDiffusion"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["text_encoder"] == ["open_clip", "local-dir"]
    assert index["prediction_type"] == "v_prediction" and index["resolution"] == 32
    assert index["latent_shape"] == [4, 8, 8] and index["lineage"] == saved["lineage"]
    assert index["text_encoder_info"]["width"] == 32 and index["text_encoder_info"]["context_length"] == 16
    for f in (
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/open_clip_config.json",
        "text_encoder/open_clip_model.safetensors",
        "empty_text_emb.npy",
    ):
        assert (out / f).is_file(), f  # fmt: skip
    assert np.load(out / "empty_text_emb.npy").shape == (16, 32)


def test_scheduler_is_the_training_schedule(saved):
    sched = DDPMScheduler.from_pretrained(str(saved["dir"]), subfolder="scheduler")
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "scaled_linear"
    assert sched.config.prediction_type == "v_prediction" and not sched.config.clip_sample
    want = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sched.betas.double(), want, rtol=1e-5)


def test_parts_load_in_their_own_ecosystems(saved):
    out = saved["dir"]
    unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(out), subfolder="vae")
    for a, b in ((unet, saved["unet"]), (vae, saved["vae"])):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'text_encoder'}")
    assert model.positional_embedding.shape == (16, 32)
    # the copied text encoder encodes exactly like the original export
    mine, orig = load_text_encoder(str(out / "text_encoder"), device="cpu"), load_text_encoder(str(saved["clip"]))
    texts = ["a red circle", "a blue star on a yellow background", ""]
    assert torch.equal(mine.encode(texts), orig.encode(texts))
    assert torch.equal(torch.from_numpy(np.load(out / "empty_text_emb.npy")), orig.empty())


def test_round_trip_generates_the_same_images(saved):
    pipe = load_pipeline(saved["dir"])
    assert pipe.prediction_type == "v_prediction" and pipe.resolution == 32 and pipe.latent_shape == (4, 8, 8)
    encoder = load_text_encoder(str(saved["clip"]))
    in_memory = LdmPipeline(
        saved["unet"], saved["vae"], encoder, default_scheduler_config("v_prediction"), "v_prediction", 32,
        encoder.empty(),
    )  # fmt: skip
    kw = {"steps": 4, "guidance": 3.0, "seed": 7, "n": 2}
    a = generate(pipe, ["a red circle", "a green star"], **kw)
    b = generate(in_memory, ["a red circle", "a green star"], **kw)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    # the schedule's prediction type matters: the same weights read as epsilon-prediction give other images
    eps = LdmPipeline(
        saved["unet"], saved["vae"], encoder, default_scheduler_config("epsilon"), "epsilon", 32, encoder.empty()
    )
    assert not torch.equal(a, generate(eps, ["a red circle", "a green star"], **kw))


def test_saving_again_overwrites_and_bad_folders_fail_in_one_line(saved, tmp_path):
    unet, vae, clip_dir = make_tiny_parts(tmp_path, seed=1)
    save_pipeline(tmp_path / "m", unet, vae, clip_dir)
    save_pipeline(tmp_path / "m", unet, vae, clip_dir, prediction_type="v_prediction")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="not a pipeline folder"):
        load_pipeline(tmp_path / "nothing")
    with pytest.raises(ValueError, match="prediction_type"):
        save_pipeline(tmp_path / "x", unet, vae, clip_dir, prediction_type="sample")
    wide = build_unet("tiny", cross_attention_dim=64, sample_size=8)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        save_pipeline(tmp_path / "y", wide, vae, clip_dir)
    assert not (tmp_path / "y" / "model_index.json").exists()  # an incomplete folder never has an index


def test_loading_prints_no_warning_about_accelerate(saved, capfd, caplog):
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        load_pipeline(saved["dir"])
    out = capfd.readouterr()
    assert "accelerate" not in caplog.text + out.err + out.out  # the plain load asks for no optional package


def test_copying_a_text_tower_over_an_older_one_leaves_no_stale_weights(tmp_path):
    from training.models.pipeline import OPEN_CLIP_FILES, _copy_text_encoder

    src, dst = tmp_path / "src", tmp_path / "dst"
    for folder, weights in ((src, "open_clip_pytorch_model.bin"), (dst, "open_clip_model.safetensors")):
        folder.mkdir()
        for name in (*OPEN_CLIP_FILES, weights):
            (folder / name).write_text(f"{folder.name} {name}")
    _copy_text_encoder(src, None, dst)  # open_clip prefers .safetensors: the old tower would have been loaded
    assert sorted(p.name for p in dst.iterdir()) == sorted([*OPEN_CLIP_FILES, "open_clip_pytorch_model.bin"])
    assert (dst / "open_clip_pytorch_model.bin").read_text() == "src open_clip_pytorch_model.bin"
