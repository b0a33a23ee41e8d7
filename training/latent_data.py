"""Latent shards as the diffusion trainer reads them: what a dataset holds, its text side, one sample's draws."""

from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.shards import iter_samples, shard_urls
from training.objectives import sample_noise, sample_timestep


@dataclass(frozen=True)
class LatentSet:
    """What the loop needs to know about a latent dataset: its first sample's fields and its manifest's config."""

    root: str  # the dataset directory (where empty_text_emb.npy lives)
    latent_shape: tuple[int, ...]  # (C, h, w)
    text_in_shards: bool  # per-sample text_emb.npy present (else captions are encoded in the loop)
    text_width: int | None  # D of the stored embeddings
    has_logvar: bool
    scaling_factor: float | None  # the VAE's, from the manifest
    info: dict  # the manifest's config ({} when there is none)
    text_shape: tuple[int, ...] | None = None  # (L, D) of the stored embeddings


def inspect_latents(data: str, storage_options: dict | None = None) -> LatentSet:
    """Read a latent dataset's manifest config and first sample; raises ``ValueError`` if it holds no latents."""
    from pipeline.latents import latent_info

    urls = shard_urls(data, storage_options)
    if not urls:
        raise FileNotFoundError(f"no shards found in {data}")
    root = urls[0].rsplit("/", 1)[0]
    errors: Counter = Counter()  # an empty or corrupt shard is passed over: the first readable sample decides
    first = None
    for url in urls:
        for raw in iter_samples(url, storage_options, decode=False, errors=errors):
            if "latent.npy" not in raw:
                raise ValueError(f"{raw['__url__']}: no <key>.latent.npy in the first sample: not a latent dataset")
            try:  # only the arrays; a caption or json that does not decode is the loop's concern (a counted skip)
                first = {k: np.load(io.BytesIO(raw[k]), allow_pickle=False) for k in raw if k.endswith(".npy")}
            except (ValueError, OSError, EOFError):
                errors["decode_error"] += 1
                continue
            break
        if first is not None:
            break
    if first is None:
        raise ValueError(f"{data}: no readable sample in {len(urls)} shard(s) ({dict(errors) or 'all empty'})")
    try:
        info = latent_info(root, storage_options)
    except FileNotFoundError:
        info = {}
    scale = info.get("scaling_factor", (info.get("vae") or {}).get("scaling_factor"))
    has_text = "text_emb.npy" in first
    width = int(first["text_emb.npy"].shape[-1]) if has_text else None
    scale = float(scale) if scale is not None else None
    text_shape = tuple(first["text_emb.npy"].shape) if has_text else None
    shape = tuple(first["latent.npy"].shape)
    return LatentSet(root, shape, has_text, width, "logvar.npy" in first, scale, info, text_shape)


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # header -> (dtype, shape, fortran order)


def _npy(data: bytes) -> torch.Tensor:
    """An ``.npy`` file's array as float32. A dataset's arrays share a few headers: each is parsed once (by
    ``np.load``) and the rest are read straight from the buffer; a cut array is a ``ValueError`` either way."""
    head = data[:12]
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))  # its own error
    start = 10 if head[6] == 1 else 12  # version 1 has a 2-byte header length, versions 2 and 3 a 4-byte one
    end = start + int.from_bytes(head[8:start], "little")
    known = _NPY_HEADERS.get(data[:end])
    if known is None:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if len(_NPY_HEADERS) < 64 and not arr.dtype.hasobject:
            _NPY_HEADERS[data[:end]] = (arr.dtype, arr.shape, arr.flags.f_contiguous and arr.ndim > 1)
        return torch.from_numpy(arr.astype(np.float32))
    dtype, shape, fortran = known
    arr = np.frombuffer(data, dtype, count=int(np.prod(shape, dtype=np.int64)), offset=end)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return torch.from_numpy(arr.astype(np.float32))


def latent_map(
    sample: dict,
    rng: random.Random,
    scale: float | None,
    text: bool,
    offset: float,
    flip_p: float,
    shape: tuple[int, ...] | None = None,  # the dataset's latent shape: another one is a ValueError (a counted skip)
    text_shape: tuple[int, ...] | None = None,  # the same for the stored text embeddings
    timesteps: tuple[str, float, float] = ("uniform", 0.0, 1.0),  # sample_timestep's sampling, mean and std
) -> dict:
    """Raw latent sample -> {"latent", "noise", "timestep", "drop_u", "text_emb" | "caption"}, drawn from ``rng``.

    The latent is the flipped one with probability ``flip_p`` when stored, and a draw from the posterior
    ``mean + scale * exp(logvar / 2) * eps`` when the log-variance is stored (the mean is stored already times the
    VAE's scaling factor ``scale``). ``text``: the shards hold text embeddings (else the caption is passed on).
    ``offset``: the offset-noise strength.
    """
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    flip = "_flip" if "latent_flip.npy" in sample and rng.random() < flip_p else ""
    latent = _npy(sample[f"latent{flip}.npy"])
    if shape is not None and tuple(latent.shape) != tuple(shape):
        raise ValueError(f"latent of shape {tuple(latent.shape)}, the dataset's is {tuple(shape)}")
    if f"logvar{flip}.npy" in sample:
        logvar = _npy(sample[f"logvar{flip}.npy"])
        if scale is None or logvar.shape != latent.shape:  # a damaged sample, or one unlike the dataset's first
            raise ValueError(f"logvar of shape {tuple(logvar.shape)} beside a latent of {tuple(latent.shape)}")
        latent = latent + scale * torch.exp(0.5 * logvar) * torch.randn(latent.shape, generator=g)
    out = {
        "latent": latent,
        "noise": sample_noise(tuple(latent.shape), offset, g),
        "timestep": sample_timestep(g, *timesteps),
        "drop_u": torch.rand((), generator=g),  # the sample's conditioning is dropped when drop_u < cond_dropout
    }
    if text:
        out["text_emb"] = _npy(sample["text_emb.npy"])
        if text_shape is not None and tuple(out["text_emb"].shape) != tuple(text_shape):
            raise ValueError(f"text embedding of shape {tuple(out['text_emb'].shape)}, not {tuple(text_shape)}")
    else:
        out["caption"] = sample["txt"].decode("utf-8")
    return out


def empty_embedding(latents: LatentSet, encoder, storage_options: dict | None) -> torch.Tensor:
    """The (L, D) empty-prompt embedding: the dataset's ``empty_text_emb.npy``, else the text encoder's."""
    from pipeline.latents import read_empty_embedding

    try:
        stored = torch.from_numpy(read_empty_embedding(latents.root, storage_options).astype(np.float32))
    except FileNotFoundError:
        if encoder is None:
            raise ValueError(f"{latents.root}: no empty_text_emb.npy and no text encoder to compute it") from None
        return encoder.empty().float().cpu()
    if encoder is None:
        return stored
    own = encoder.empty().float().cpu()  # one forward of the tower
    if tuple(own.shape) != tuple(stored.shape):
        raise ValueError(
            f"the text encoder's embeddings are {tuple(own.shape)} (tokens, width), the dataset's "
            f"{tuple(stored.shape)}: another encoder?"
        )
    if (own - stored).norm() > 0.05 * stored.norm():
        # float16 storage or a bf16 encode differ by well under 5%; another encoder by ~100%
        raise ValueError("the text encoder's empty-prompt embedding differs from the dataset's: another encoder?")
    return stored


@dataclass(frozen=True)
class TextSide:
    """How the U-Net is conditioned: the text encoder (or None), the empty prompt, where the embeddings come from."""

    encoder: object  # training.models.text.TextEncoder, or None when the stored embeddings are enough
    empty: torch.Tensor  # (L, D) empty-prompt embedding on the training device
    width: int  # D, the U-Net's cross-attention width
    stored: bool  # the shards' text_emb.npy condition the U-Net (else the encoder runs on the captions)
    in_loop: bool  # the encoder runs in the loop (--text-in-loop or --train-text-encoder)
    model: str | None  # the encoder's reference: the config's, else the latent manifest's
    pretrained: str | None


def text_conditioning(cfg, latents: LatentSet, device: torch.device, is_main: bool) -> TextSide:
    """Load what the trainer's ``cfg`` needs to condition on ``latents``; a mismatch is a one-line ``ValueError``."""
    from training.models.text import load_text_encoder

    te = latents.info.get("text_encoder") or {}  # the encoder the latent manifest records, unless the config names one
    model, pretrained = (
        (cfg.text_encoder, cfg.text_pretrained) if cfg.text_encoder else (te.get("model"), te.get("pretrained"))
    )
    encoder = None
    in_loop = cfg.text_in_loop or cfg.train_text_encoder
    stored = latents.text_in_shards and not in_loop  # the shards' embeddings condition the U-Net
    if cfg.text_in_loop and not cfg.text_encoder:
        raise ValueError("--text-in-loop needs --text-encoder: the encoder to run on the captions")
    # a named encoder is always loaded: with stored embeddings, its empty-prompt embedding must match theirs, or
    # the pipeline folder would pair the U-Net with a text encoder it never saw
    if not stored or cfg.text_encoder or (is_main and cfg.sample_every > 0 and model):
        if model is None:
            need = "--train-text-encoder needs a tower" if cfg.train_text_encoder else "the shards hold captions only"
            raise ValueError(f"{need}: give --text-encoder (the latent manifest names none)")
        encoder = load_text_encoder(model, pretrained, device=str(device))
    if stored:  # the dataset's empty embedding, checked against the encoder when one is loaded
        try:
            empty = empty_embedding(latents, encoder, cfg.storage_options).to(device)
        except ValueError as e:
            hint = " (re-encode the latents with it, or add --text-in-loop)" if cfg.text_encoder else ""
            raise ValueError(f"{e}{hint}") from None
        width = latents.text_width or encoder.width
    else:  # the encoder runs on the captions (in the loop, or the shards hold captions only): its own empty prompt
        empty = encoder.empty().float().to(device)
        width = encoder.width
    return TextSide(encoder, empty, width, stored, in_loop, model, pretrained)
