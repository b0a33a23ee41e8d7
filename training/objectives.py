"""Training objectives: the CLIP contrastive loss, the latent diffusion schedule, noising and losses, the VAE loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.distributed import gather_with_grad

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100 to keep training stable (Radford et al. 2021, sec. 2.5)


def clip_loss(
    image_features: torch.Tensor,  # (n, d), L2-normalised, this rank's batch
    text_features: torch.Tensor,  # (n, d), L2-normalised, row i pairs with image row i
    logit_scale: torch.Tensor,  # exp of the learned log temperature, already clamped
) -> torch.Tensor:
    """Symmetric cross-entropy over the similarity matrix of this rank's rows against every rank's batch.

    Local-loss style: each rank scores its own n images against all N texts (and its n texts against all N
    images), with the positives on the diagonal block of its rank. Gathering keeps the gradient (it reduces
    every rank's share back to the owner), so the sum over ranks equals the single-process loss over N rows and
    DDP's gradient average gives exactly the single-process gradient.
    """
    n = image_features.shape[0]
    all_images = gather_with_grad(image_features)
    all_texts = gather_with_grad(text_features)
    rank_offset = _rank() * n
    labels = torch.arange(n, device=image_features.device) + rank_offset
    logits_per_image = logit_scale * image_features @ all_texts.T  # (n, N)
    logits_per_text = logit_scale * text_features @ all_images.T  # (n, N)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clamp_logit_scale(log_scale: torch.nn.Parameter, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Clamp the learned log temperature in place so that exp(log_scale) <= ``max_scale``."""
    with torch.no_grad():
        log_scale.clamp_(0, torch.log(torch.tensor(max_scale)).item())


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------------------------------------- latent diffusion
#
# DDPM (Ho et al. 2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with abar_t = prod_{s<=t} (1 - beta_s).
# Stable Diffusion's "scaled_linear" schedule spaces sqrt(beta) linearly from sqrt(0.00085) to sqrt(0.012), T = 1000.

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
PREDICTION_TYPES = ("epsilon", "v_prediction")


def scaled_linear_betas(
    num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """Stable Diffusion's betas: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (float64)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), the signal share of x_t's variance."""
    return torch.cumprod(1.0 - betas, dim=0)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[timesteps]`` shaped (B, 1, 1, ...) to broadcast against ``like``, in ``like``'s dtype and device."""
    v = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The forward process: ``sqrt(abar_t) * latents + sqrt(1 - abar_t) * noise`` per sample."""
    a = _per_sample(alphas_cumprod, timesteps, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def v_target(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The v-prediction target ``sqrt(abar_t) * noise - sqrt(1 - abar_t) * latents`` (Salimans & Ho 2022)."""
    a = _per_sample(alphas_cumprod, timesteps, latents)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` of each timestep (float32)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps]
    return (a / (1 - a)).float()


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), ``min(SNR, gamma) / SNR`` for epsilon, ``/(SNR + 1)`` for v.

    Both turn the per-timestep loss into the x_0 loss weighted by ``min(SNR, gamma)``: the many easy low-noise
    steps stop dominating the gradient.
    """
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / s if prediction == "epsilon" else clipped / (s + 1)


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def check_timestep_sampling(sampling: str) -> None:
    """One-line ``ValueError`` for a timestep sampling that is not one of ``TIMESTEP_SAMPLINGS``."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {sampling!r}: use {', '.join(TIMESTEP_SAMPLINGS)}")


def sample_timestep(
    generator: torch.Generator,
    sampling: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    num_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """One training timestep (a 0-d int64 tensor) in [0, num_timesteps).

    ``uniform``: every timestep alike (DDPM). ``logit_normal``: ``floor(T * sigmoid(u))`` with ``u ~ N(mean, std)``,
    the density Esser et al. (2024) found best for Stable Diffusion 3. It spends the steps on the middle noise levels,
    where a picture's layout and shapes are decided, and few on the nearly clean and the nearly pure-noise ends.
    ``mean`` > 0 moves it towards more noise.
    """
    if sampling == "uniform":
        return torch.randint(num_timesteps, (), generator=generator)
    check_timestep_sampling(sampling)
    u = torch.randn((), generator=generator, dtype=torch.float64) * std + mean
    return (torch.sigmoid(u) * num_timesteps).long().clamp(0, num_timesteps - 1)


def sample_noise(
    shape: tuple[int, ...],
    offset_noise: float = 0.0,  # std of a per-channel constant added to the noise; 0 = off (~0.05-0.1 when on)
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard Gaussian noise of ``shape`` (..., C, h, w), plus offset noise when asked.

    Offset noise (Guttenberg 2023) adds one Gaussian constant per channel, so the model also learns to change an
    image's mean brightness and colour, which plain per-pixel noise almost never perturbs.
    """
    noise = torch.randn(shape, generator=generator, device=device)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn((*shape[:-2], 1, 1), generator=generator, device=device)
    return noise


def swap_in_empty(text_emb: torch.Tensor, empty_emb: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``text_emb`` (B, L, D) with the rows where ``drop`` (B,) is true replaced by ``empty_emb`` (L, D)."""
    empty = empty_emb.to(text_emb.device, text_emb.dtype).expand_as(text_emb)
    return torch.where(drop.to(text_emb.device).reshape(-1, 1, 1), empty, text_emb)


def cfg_dropout(
    text_emb: torch.Tensor,  # (B, L, D) per-token hidden states of the captions
    empty_emb: torch.Tensor,  # (L, D) hidden states of the empty prompt "", as the sampler's unconditional branch
    p: float,  # probability of dropping a sample's conditioning
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance training (Ho & Salimans 2022): swap whole rows for the empty-prompt embedding.

    The dropped rows get exactly the embedding the sampler uses for its unconditional branch (not a blank
    string's tokens re-encoded differently, nor zeros), so guidance extrapolates from the right point.
    Returns the new embeddings and the (B,) boolean mask of dropped rows.
    """
    drop = torch.rand(text_emb.shape[0], generator=generator, device=generator.device if generator else None) < p
    return swap_in_empty(text_emb, empty_emb, drop), drop.to(text_emb.device)


def diffusion_loss(
    model_output: torch.Tensor,  # (B, C, h, w) the network's prediction
    latents: torch.Tensor,  # (B, C, h, w) clean latents x_0
    noise: torch.Tensor,  # (B, C, h, w) the noise added
    timesteps: torch.Tensor,  # (B,) int
    alphas_cumprod: torch.Tensor,  # (T,)
    prediction: str = "epsilon",  # "epsilon" | "v_prediction"
    min_snr_gamma: float = 0.0,  # 0 = unweighted
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weighted) mean squared error against the epsilon or v target, and each sample's unweighted MSE (B,)."""
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = v_target(latents, noise, timesteps, alphas_cumprod)
    else:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma > 0:
        loss = (per_sample * min_snr_weights(timesteps, alphas_cumprod, min_snr_gamma, prediction)).mean()
    else:
        loss = per_sample.mean()
    return loss, per_sample.detach()


def vae_loss(
    recon: torch.Tensor, images: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, loss: str = "l1"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction loss per pixel element, KL(q(z|x) || N(0, I)) summed over the latent per pixel element).

    Dividing the summed KL by the image's element count keeps ``kl_weight`` on Stable Diffusion's scale, whose
    loss sums both terms over each image.
    """
    diff = recon.float() - images.float()
    rec = diff.abs().mean() if loss == "l1" else (diff * diff).mean()
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean * mean + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
    return rec, kl.mean() / images[0].numel()
