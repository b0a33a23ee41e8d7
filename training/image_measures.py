"""Measures on images and features for the diffusion evaluation: Frechet distance, palette pixel share, hue mass.

Pure functions of their inputs (numpy, no models), so each is tested on cases known by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.demo_site import COLOURS
from pipeline.demo_site.scenes import BACKGROUND_RGB, RGB

PALETTE_BACKGROUNDS = ("gray", "beige", "light blue", "navy", "dark green")  # backgrounds unlike any shape colour
PIXEL_MATCH = 80.0  # max Euclidean RGB distance for a pixel to count as a palette colour
# white and black pixels are mostly the white and black backgrounds (the same RGB within PIXEL_MATCH), so the
# automatic choice leaves them out: their share says little about the shapes' colour
CHROMATIC = tuple(c for c in COLOURS if c not in ("white", "black"))


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(n, d)`` (float64, no scipy needed).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2)``, with ``tr((S_a S_b)^1/2)`` computed as the sum
    of square roots of the eigenvalues of ``S_a^1/2 S_b S_a^1/2`` (symmetric, so ``eigh`` is exact and stable).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (n>=2, d) feature sets of the same width, got {a.shape} and {b.shape}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def _palette() -> tuple[list[str], np.ndarray]:
    names = list(COLOURS) + [f"background:{b}" for b in PALETTE_BACKGROUNDS]
    rgb = [RGB[c] for c in COLOURS] + [BACKGROUND_RGB[b] for b in PALETTE_BACKGROUNDS]
    return names, np.asarray(rgb, dtype=np.float32)


def pixel_share(images: torch.Tensor, colour: str) -> float:
    """Share of pixels whose nearest demo palette colour (shapes + unambiguous backgrounds) is ``colour``."""
    names, rgb = _palette()
    px = images.permute(0, 2, 3, 1).reshape(-1, 3).numpy().astype(np.float32)
    d = np.linalg.norm(px[:, None, :] - rgb[None, :, :], axis=2)
    nearest = d.argmin(1)
    hit = (nearest == names.index(colour)) & (d.min(1) < PIXEL_MATCH)
    return float(hit.mean())


def _hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB (..., 3) in 0..255 -> hue in degrees, saturation and value in 0..1."""
    x = x.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    c = mx - mn
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.where(c > 0, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    s = np.where(mx > 0, c / np.where(mx > 0, mx, 1.0), 0.0)
    return h * 60.0, s, mx


def _hue_gap(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def hue_ambiguous(colour: str, width: float = 30.0) -> str | None:
    """The other palette colour within half of ``width`` degrees of ``colour``'s hue (brown is a dark orange, 4
    degrees away), or None.

    Hue mass cannot tell such colours apart, so it is not reported for them; pixel share (nearest RGB) can.
    """
    hues = {c: _hsv(np.asarray(RGB[c], dtype=np.float32))[0].item() for c in CHROMATIC}
    near = [c for c in CHROMATIC if c != colour and _hue_gap(hues[c], hues[colour]) < width / 2]
    return near[0] if near else None


def hue_mass(images: torch.Tensor, colour: str, width: float = 30.0) -> float:
    """Mean over pixels of saturation x value x a triangular hue window (``width`` degrees) around ``colour``'s hue."""
    h0, s0, _ = _hsv(np.asarray(RGB[colour], dtype=np.float32)[None])
    if s0[0] < 0.2:
        raise ValueError(f"{colour!r} has no hue (white, black or grey): use pixel_share")
    other = hue_ambiguous(colour, width)
    if other is not None:
        raise ValueError(f"{colour!r} and {other!r} lie within {width / 2:g} degrees of hue: use pixel_share")
    h, s, v = _hsv(images.permute(0, 2, 3, 1).numpy())
    return float((s * v * np.clip(1 - _hue_gap(h, h0[0]) / width, 0, None)).mean())
