"""The latent stage's image autoencoder: a diffusers ``AutoencoderKL`` from a JSON config, a local folder or a hub id.

Images entering and leaving the VAE are float tensors in [-1, 1], shape (B, 3, H, W). Latents handed to the
diffusion model are the posterior mean times ``config.scaling_factor`` (Rombach et al. 2022, sec. 4.3 / app. G:
scale so the latents have unit variance); :func:`encode_posterior` returns them unscaled, :func:`decode_latents`
takes them scaled. Models run channels_last: GroupNorm convolutions are faster that way on CPU and GPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from pipeline.shards import sha256_file

CONFIG_DIR = Path(__file__).parent / "configs"
VAE_PREFIX = "vae-"  # "tiny" -> configs/vae-tiny.json
CONFIG_FILE = "config.json"  # what diffusers' save_pretrained writes beside the weights


def vae_config(config: str) -> dict:
    """The AutoencoderKL config dict of a project config name ("tiny", "sd") or a JSON file path."""
    path = Path(config) if config.endswith(".json") else CONFIG_DIR / f"{VAE_PREFIX}{config}.json"
    if not path.is_file():
        known = sorted(p.stem.removeprefix(VAE_PREFIX) for p in CONFIG_DIR.glob(f"{VAE_PREFIX}*.json"))
        raise ValueError(f"unknown VAE config {config!r}: not a JSON file or one of {known}")
    return json.loads(path.read_text(encoding="utf-8"))


def build_vae(config: str) -> AutoencoderKL:
    """A randomly initialised fp32 AutoencoderKL (channels_last) from a project config name or JSON path."""
    cfg = {k: v for k, v in vae_config(config).items() if not k.startswith("_")}
    return AutoencoderKL.from_config(cfg).to(memory_format=torch.channels_last)


def _vae_dir(ref: str) -> tuple[Path, str | None] | None:
    """(folder, subfolder) of a local diffusers VAE folder or pipeline folder (its ``vae/``), else None."""
    path = Path(ref)
    if (path / CONFIG_FILE).is_file():
        return path, None
    if (path / "vae" / CONFIG_FILE).is_file():
        return path, "vae"
    return None


def load_vae(ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A pretrained AutoencoderKL (eval mode, channels_last) from a diffusers folder, a pipeline folder or a hub id.

    Raises ``ValueError`` with one line when it cannot be loaded (a local path that is no VAE folder, a hub id this
    machine cannot fetch, ...).
    """
    local = _vae_dir(ref)
    if local is None and Path(ref).exists():
        raise ValueError(f"{ref}: not a diffusers AutoencoderKL folder (no {CONFIG_FILE}, no vae/{CONFIG_FILE})")
    if local is not None:  # diffusers would load another model's folder with random weights and a warning
        folder = local[0] / local[1] if local[1] else local[0]
        try:
            kind = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"cannot load VAE {ref!r} (local folder): unreadable {CONFIG_FILE} ({e})") from None
        if kind != "AutoencoderKL":
            raise ValueError(f"{ref}: its {CONFIG_FILE} describes a {kind or 'model without _class_name'}, not an "
                             "AutoencoderKL")  # fmt: skip
    name, subfolder = (str(local[0]), local[1]) if local is not None else (ref, None)
    try:
        vae, info = AutoencoderKL.from_pretrained(
            name, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:  # diffusers raises OSError/EnvironmentError for hub failures
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "local folder" if local is not None else "not a local folder; hub id"
        raise ValueError(f"cannot load VAE {ref!r} ({where}): {first}") from e
    missing = info.get("missing_keys") or []
    if missing:
        raise ValueError(f"cannot load VAE {ref!r}: its weights lack {len(missing)} tensor(s), e.g. {missing[0]}")
    return vae.to(device=device, memory_format=torch.channels_last).eval().requires_grad_(False)


def save_vae(vae: AutoencoderKL, out_dir: str | Path) -> Path:
    """Save as a diffusers folder (config.json + safetensors weights) that ``AutoencoderKL.from_pretrained`` loads."""
    out = Path(out_dir)
    vae = getattr(vae, "module", vae)  # unwrap DDP
    vae.save_pretrained(str(out), safe_serialization=True)
    return out


def downsample_factor(config: dict) -> int:
    """Pixels per latent cell along one side: each encoder block but the last halves the resolution."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def vae_fingerprint(ref: str) -> dict:
    """What a manifest records about the VAE: ref, weights sha256 (local folders), scaling factor, latent shape."""
    local = _vae_dir(ref)
    sha = None
    try:
        if local is not None:
            folder = local[0] / local[1] if local[1] else local[0]
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            weights = folder / SAFETENSORS_WEIGHTS_NAME
            sha = sha256_file(str(weights)) if weights.is_file() else None
        else:
            config = AutoencoderKL.load_config(ref)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read VAE config {ref!r}: {str(e).strip().splitlines()[0]}") from e
    return {
        "ref": str(ref),
        "sha256": sha,
        "scaling_factor": float(config.get("scaling_factor", 0.18215)),
        "latent_channels": int(config.get("latent_channels", 4)),
        "downsample": downsample_factor(config),
    }


def encode_posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, log-variance), unscaled, of images in [-1, 1]; runs in the caller's grad mode."""
    x = images.to(device=vae.device, dtype=vae.dtype, memory_format=torch.channels_last)
    posterior = vae.encode(x).latent_dist
    return posterior.mean, posterior.logvar


def decode_latents(vae: AutoencoderKL, scaled_latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents already multiplied by ``vae.config.scaling_factor``."""
    z = scaled_latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    return vae.decode(z.contiguous(memory_format=torch.channels_last)).sample.clamp(-1, 1)


@torch.inference_mode()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Decode(posterior mean) of images in [-1, 1], as float32 in [-1, 1] on the images' device."""
    mean, _ = encode_posterior(vae, images)
    return decode_latents(vae, mean * vae.config.scaling_factor).float().to(images.device)


def _as_tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB over all elements: uint8 images (peak 255) or floats in [-1, 1] (peak 2)."""
    a, b = _as_tensor(a), _as_tensor(b)
    peak = 255.0 if a.dtype == torch.uint8 else 2.0
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def heldout_psnr(vae: AutoencoderKL, batches: Iterable[torch.Tensor]) -> tuple[float, int]:
    """(mean per-image PSNR in dB of reconstructions, number of images) over batches of images in [-1, 1]."""
    total, n = 0.0, 0
    for images in batches:
        recon = reconstruct(vae, images)
        for x, y in zip(images.float(), recon, strict=True):
            total += psnr(x, y)
            n += 1
    if n == 0:
        raise ValueError("no images to compute PSNR on")
    return total / n, n


@torch.inference_mode()
def latent_scaling_factor(vae: AutoencoderKL, batches: Iterable[torch.Tensor]) -> tuple[float, float, int]:
    """(1 / std, std, element count) of the posterior-mean latents of batches of images in [-1, 1].

    The std is over every latent element (all channels and positions pooled), unbiased, as Stable Diffusion's
    0.18215 was computed; accumulated in float64 so any number of batches fits.
    """
    s, ss, n = 0.0, 0.0, 0
    for images in batches:
        mean, _ = encode_posterior(vae, images)
        m = mean.double()
        s, ss, n = s + float(m.sum()), ss + float((m * m).sum()), n + m.numel()
    if n < 2:
        raise ValueError("need at least one image to compute the latent scaling factor")
    var = (ss - s * s / n) / (n - 1)
    if not math.isfinite(var) or var <= 0:
        raise ValueError(f"the latents have no finite spread (variance {var:g}): the VAE diverged or is constant")
    std = math.sqrt(var)
    return 1.0 / std, std, n
