"""Training objectives: the CLIP contrastive loss (the diffusion loss will live here too)."""

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
