"""The VAE model module: configs, the diffusers save/load round trip, fingerprints, scaling, PSNR."""

import hashlib
import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from training.models.vae import (
    build_vae,
    decode_latents,
    encode_posterior,
    heldout_psnr,
    latent_scaling_factor,
    load_vae,
    psnr,
    reconstruct,
    save_vae,
    vae_config,
    vae_fingerprint,
)

torch.set_num_threads(1)


def tiny(seed: int = 0, scaling_factor: float = 0.5) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae.eval()


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_tiny_config_gives_4x_downsampling_and_4_channels():
    vae = tiny()
    assert vae.config.block_out_channels == (16, 32, 64) or list(vae.config.block_out_channels) == [16, 32, 64]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in vae.parameters() if p.ndim == 4)
    x = images(2)
    with torch.no_grad():
        mean, logvar = encode_posterior(vae, x)
        out = decode_latents(vae, mean * vae.config.scaling_factor)
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1


def test_sd_config_matches_stable_diffusion_vae():
    cfg = vae_config("sd")
    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters)
    assert {k for k in cfg if not k.startswith("_")} <= allowed  # every field is an AutoencoderKL argument
    assert cfg["block_out_channels"] == [128, 256, 512, 512] and cfg["layers_per_block"] == 2
    assert cfg["latent_channels"] == 4 and cfg["scaling_factor"] == 0.18215 and cfg["norm_num_groups"] == 32
    vae = build_vae("sd")
    assert 80e6 < sum(p.numel() for p in vae.parameters()) < 90e6  # SD's VAE has 83.7M parameters
    with torch.no_grad():
        mean, _ = encode_posterior(vae, images(1, 16))
    assert mean.shape == (1, 4, 2, 2)  # 8x downsampling
    assert vae.config.scaling_factor == 0.18215
    with pytest.raises(ValueError, match="unknown VAE config"):
        vae_config("no-such-vae")


def test_save_load_round_trip_plain_and_pipeline_folders(tmp_path):
    vae = tiny(seed=3, scaling_factor=0.37)
    x = images(2, seed=1)
    with torch.no_grad():
        want_mean, want_logvar = encode_posterior(vae, x)
        want = vae.decode(want_mean).sample
    save_vae(vae, tmp_path / "vae_dir")
    save_vae(vae, tmp_path / "pipe" / "vae")
    loaded = [
        AutoencoderKL.from_pretrained(str(tmp_path / "vae_dir")),
        load_vae(str(tmp_path / "vae_dir")),
        load_vae(str(tmp_path / "pipe")),  # a pipeline folder: its vae/ subfolder
    ]
    for other in loaded:
        other.eval()
        assert other.config.scaling_factor == pytest.approx(0.37)
        with torch.no_grad():
            mean, logvar = encode_posterior(other, x)
            assert torch.equal(mean, want_mean) and torch.equal(logvar, want_logvar)
            assert torch.equal(other.decode(mean).sample, want)
    assert not any(p.requires_grad for p in loaded[1].parameters())
    weights = tmp_path / "vae_dir" / "diffusion_pytorch_model.safetensors"
    fp = vae_fingerprint(str(tmp_path / "vae_dir"))
    assert fp == {
        "ref": str(tmp_path / "vae_dir"),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "scaling_factor": pytest.approx(0.37),
        "latent_channels": 4,
        "downsample": 4,
    }
    assert vae_fingerprint(str(tmp_path / "pipe"))["sha256"] == fp["sha256"]


def test_load_vae_failures_are_one_line_value_errors(tmp_path):
    for ref in ("no-such-org/no-such-vae", str(tmp_path)):  # a hub id offline; a folder without a config
        with pytest.raises(ValueError) as info:
            load_vae(ref)
        assert "\n" not in str(info.value) and ref in str(info.value)
    with pytest.raises(ValueError):
        vae_fingerprint("no-such-org/no-such-vae")


def test_another_models_folder_or_missing_weights_are_refused(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(str(tmp_path / "unet"))  # fmt: skip
    with pytest.raises(ValueError, match="describes a UNet2DModel, not an AutoencoderKL"):
        load_vae(str(tmp_path / "unet"))
    save_vae(tiny(), tmp_path / "vae")
    from safetensors.torch import load_file, save_file

    weights = next((tmp_path / "vae").glob("*.safetensors"))
    state = load_file(str(weights))
    state.pop(next(iter(state)))
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="weights lack 1 tensor"):
        load_vae(str(tmp_path / "vae"))


def test_decode_divides_by_the_scaling_factor():
    vae = tiny(scaling_factor=0.25)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(decode_latents(vae, z * 0.25), vae.decode(z).sample.clamp(-1, 1))
        x = images(2)
        mean, _ = encode_posterior(vae, x)
        assert torch.allclose(reconstruct(vae, x), vae.decode(mean).sample.clamp(-1, 1))


def test_psnr_values():
    a = np.full((4, 4, 3), 100, dtype=np.uint8)
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255))  # mse 1
    x = images(2)
    assert psnr(x, x + 0.2) == pytest.approx(20.0)  # mse 0.04, peak-to-peak 2: 10 log10(4 / 0.04)
    assert psnr(x, x) == math.inf
    vae = tiny()
    value, n = heldout_psnr(vae, [x[:1], x[1:]])
    recon = reconstruct(vae, x)
    assert n == 2 and value == pytest.approx((psnr(x[0], recon[0]) + psnr(x[1], recon[1])) / 2)


def test_scaling_factor_is_one_over_latent_std():
    vae = tiny()
    batches = [images(3, seed=s) * (0.3 + s) for s in range(3)]
    factor, std, n = latent_scaling_factor(vae, batches)
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in batches])
    assert n == latents.numel()
    assert std == pytest.approx(float(latents.double().std()), rel=1e-6)
    assert factor == pytest.approx(1 / float(latents.double().std()), rel=1e-6)
