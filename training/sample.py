"""Text-to-image sampling from a pipeline folder: DDIM or DPM-Solver++, classifier-free guidance, negative prompts.

Every image has its own seed (``seed + i`` for the i-th image), so an image depends only on its prompt, its seed
and the settings, never on the batch it was generated in. Guidance follows Ho & Salimans (2022):
``out = out_u + g * (out_c - out_u)``, where the unconditional branch ``out_u`` reads the negative prompt's
embedding when one is given (that is what makes "blue" as a negative push the image away from blue) and the empty
prompt's embedding that CFG dropout trained with otherwise. ``python -m training.sample MODEL_DIR "a red circle"
--out grid.png`` writes a PNG grid whose text chunks record the prompt, negative, seed, steps, guidance and sampler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline.shards import without_lone_surrogates
from training.loop import ArgumentParser

SCHEDULERS = ("dpm", "ddim")
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1 (and wraps a negative seed onto that range)


class NonFiniteOutputError(ValueError):
    """The U-Net or the VAE produced NaN or inf: a diverged checkpoint or a reduced-precision overflow."""


def make_scheduler(train_config: dict, name: str):
    """A sampling scheduler on the training noise schedule: ``"dpm"`` (DPM-Solver++ 2M) or ``"ddim"`` (eta 0).

    Both use "trailing" timestep spacing, so the first step starts at t = T - 1, where the training noise lives
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2), and both end on a
    clean sample. DDIM is first-order DPM-Solver++, the same update (Lu et al. 2022, section 4.1), stepped along
    the actual timesteps: diffusers' DDIMScheduler steps by T // steps, which with trailing spacing ends one noise
    level short of clean for step counts that do not divide T (15, 24, ...).
    """
    base = {k: v for k, v in train_config.items() if not k.startswith("_")}
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: use one of {SCHEDULERS}")
    return DPMSolverMultistepScheduler.from_config(
        base,
        algorithm_type="dpmsolver++",
        solver_order=2 if name == "dpm" else 1,
        timestep_spacing="trailing",
        final_sigmas_type="zero",
    )


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 (fp16 where bf16 is unsupported) autocast on CUDA for ``auto``/``bf16``/``fp16``; nothing on CPU/fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cuda", dtype=torch.bfloat16)


def check_seeds(seed: int, count: int) -> None:
    """Refuse a seed outside 0..2**64-1, or one whose last image seed (``seed + count - 1``) is past 2**64-1."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in 0..2**64-1 (0..{SEED_MAX}), got {seed}")
    if seed + count - 1 > SEED_MAX:  # image i uses seed + i
        raise ValueError(
            f"seed {seed} with {count} images needs seeds up to {seed + count - 1}, past 2**64-1: "
            f"use a seed of at most {SEED_MAX - count + 1}"
        )


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Standard Gaussian latents, one CPU generator per seed: the same seed gives the same noise on any device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 (rounded, clamped) on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _embed(pipe, texts: list[str]) -> torch.Tensor:
    """Per-token text embeddings on the pipeline's device; the empty prompt gives the stored empty embedding."""
    emb = pipe.text_encoder.encode(texts).to(pipe.device).float()
    for i, t in enumerate(texts):
        if t == "":
            emb[i] = pipe.empty_emb
    return emb


def _guided_at(t, interval: tuple[int, int] | None) -> bool:
    """Whether guidance applies at timestep ``t``: everywhere without an interval, else for lo <= t <= hi."""
    return interval is None or interval[0] <= int(t) <= interval[1]


def _denoise(pipe, cond, uncond, seeds, steps, guidance, scheduler, precision, interval=None) -> torch.Tensor:
    """Clean latents for one batch: initial noise from ``seeds``, ``steps`` sampler steps with guidance.

    Outside the guidance ``interval`` (timesteps lo..hi of the training schedule) the step uses the conditional
    prediction alone, and the unconditional pass is skipped.
    """
    sched = make_scheduler(pipe.train_scheduler_config, scheduler)  # fresh: multistep solvers keep state
    sched.set_timesteps(steps, device=pipe.device)
    latents = initial_noise(seeds, pipe.latent_shape).to(pipe.device) * sched.init_noise_sigma
    both = torch.cat([uncond, cond]).to(pipe.unet.dtype)
    for t in sched.timesteps:
        guided = guidance != 1.0 and _guided_at(t, interval)  # g = 1: the conditional prediction alone
        x = torch.cat([latents, latents]) if guided else latents
        x = sched.scale_model_input(x, t).to(pipe.unet.dtype).contiguous(memory_format=torch.channels_last)
        with autocast(pipe.device, precision):
            out = pipe.unet(x, t, encoder_hidden_states=both if guided else both[len(cond) :]).sample.float()
        if guided:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        latents = sched.step(out, t, latents).prev_sample
    return latents


def _decode(pipe, latents: torch.Tensor, precision: str) -> torch.Tensor:
    """VAE-decoded images in [-1, 1] (float, not yet clamped) for a batch of clean latents."""
    from training.models.vae import decode_latents

    with autocast(pipe.device, precision):
        return decode_latents(pipe.vae, latents).float()


def _require_finite(x: torch.Tensor, what: str, first: int, prompts: list[str], n: int, hint: str) -> None:
    """Raise NonFiniteOutputError naming ``what`` and the first bad image's prompt if ``x`` holds NaN or inf.

    One isfinite pass over a batch's final tensor: a diverged model gives NaN there whatever step it began at.
    """
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    if not bool(bad.any()):
        return
    rows = (bad.nonzero().flatten() + first).tolist()
    value = "NaN" if bool(torch.isnan(x).any()) else "inf"
    more = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
    raise NonFiniteOutputError(
        f"the model produced non-finite values ({value}) in {what} for prompt {prompts[rows[0] // n]!r} "
        f"(image {rows[0]}{more}): {hint}"
    )


def _hint(pipe, precision: str) -> str:
    """What to try after a non-finite output: fp32 where reduced precision ran, a sound checkpoint in any case."""
    if pipe.device.type == "cuda" and precision != "fp32":
        return "the checkpoint may have diverged, or reduced precision overflowed; try --precision fp32"
    return "the checkpoint may have diverged: check its weights, or use an earlier checkpoint"


@torch.inference_mode()
def generate(
    pipe,  # training.models.pipeline.LdmPipeline
    prompts: str | list[str],
    negative: str | list[str] | None = None,  # one negative for all prompts, or one per prompt
    steps: int = 50,
    guidance: float = 7.5,  # classifier-free guidance scale; 1 = unguided
    seed: int = 0,  # image i (prompt-major: prompt p, copy j is i = p * n + j) uses seed + i
    n: int = 1,  # images per prompt
    scheduler: str = "dpm",  # "dpm" (DPM-Solver++) | "ddim"
    batch_size: int = 16,  # images per U-Net batch (doubled inside when guided)
    text_emb: torch.Tensor | None = None,  # (len(prompts), L, D) precomputed prompt embeddings
    precision: str = "auto",  # "auto" | "bf16" | "fp16" | "fp32": autocast on CUDA; CPU always runs fp32
    guidance_interval: tuple[int, int] | None = None,  # guide only at timesteps lo..hi (0..T-1); None = every step
) -> torch.Tensor:
    """Generate ``n`` images per prompt: uint8 ``(len(prompts) * n, 3, H, W)`` on the CPU.

    ``guidance_interval`` limits guidance to part of the noise levels (Kynkaenniemi et al. 2024, "Applying
    Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models"); the other steps
    use the conditional prediction alone, so a negative prompt acts only inside the interval.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate for")
    if steps < 1 or n < 1 or batch_size < 1:
        raise ValueError(f"steps, n and batch_size must be >= 1, got {steps}, {n}, {batch_size}")
    train_steps = int(pipe.train_scheduler_config.get("num_train_timesteps", 1000))
    if steps > train_steps:
        raise ValueError(f"steps must be at most the {train_steps} timesteps the model was trained on, got {steps}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}: use one of {SCHEDULERS}")
    check_seeds(seed, len(prompts) * n)
    if guidance_interval is not None:
        lo, hi = (int(v) for v in guidance_interval)
        if not 0 <= lo <= hi < train_steps:
            raise ValueError(
                f"guidance interval must be 0 <= lo <= hi < {train_steps} (timesteps of the training schedule), "
                f"got {lo} {hi}"
            )
        guidance_interval = (lo, hi)
    cond = _embed(pipe, prompts) if text_emb is None else text_emb.to(pipe.device).float()
    if cond.shape[0] != len(prompts):
        raise ValueError(f"text_emb has {cond.shape[0]} rows for {len(prompts)} prompts")
    if negative is None:
        uncond = pipe.empty_emb.expand(len(prompts), *pipe.empty_emb.shape)
    elif isinstance(negative, str):
        uncond = _embed(pipe, [negative]).expand(len(prompts), -1, -1)
    else:
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        uncond = _embed(pipe, list(negative))
    cond, uncond = cond.repeat_interleave(n, dim=0), uncond.repeat_interleave(n, dim=0)
    seeds = [int(seed) + i for i in range(cond.shape[0])]
    hint, out = _hint(pipe, precision), []
    for b in range(0, len(seeds), batch_size):
        sl = slice(b, b + batch_size)
        z = _denoise(pipe, cond[sl], uncond[sl], seeds[sl], steps, guidance, scheduler, precision, guidance_interval)
        _require_finite(z, f"the latents after {steps} sampling steps (U-Net)", b, prompts, n, hint)
        images = _decode(pipe, z, precision)
        _require_finite(images, "the decoded images (VAE decoder)", b, prompts, n, hint)
        out.append(to_uint8(images))
    return torch.cat(out)


def make_grid(images: torch.Tensor, cols: int | None = None, pad: int = 2) -> Image.Image:
    """uint8 ``(n, 3, h, w)`` images tiled row by row (``cols`` per row, default ~square) with ``pad`` px gaps."""
    n, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return Image.fromarray(grid, "RGB")


def grid_meta(
    prompts: list[str],
    *,
    negative: str | None,
    seed: int,
    steps: int,
    guidance: float,
    guidance_interval: tuple[int, int] | None,
    scheduler: str,
    n: int,
    precision: str,
    model: str,
) -> dict:
    """The PNG metadata of a generated grid, the same from ``altforge generate`` and a recipe's generate stage."""
    meta = {"prompt": prompts[0]} if len(prompts) == 1 else {}
    return {
        **meta,
        "prompts": list(prompts),
        "negative": negative or "",
        "seed": seed,
        "seeds": f"image i, row by row, uses seed + i ({seed}..{seed + len(prompts) * n - 1})",
        "steps": steps,
        "guidance": guidance,
        "guidance_interval": " ".join(map(str, guidance_interval)) if guidance_interval else "all steps",
        "scheduler": scheduler,
        "n": n,
        "precision": precision,
        "model": os.path.abspath(model),
    }


def save_grid(images: torch.Tensor, path: str | Path, meta: dict, cols: int | None = None) -> Path:
    """Write a PNG grid of uint8 images with every ``meta`` entry as a PNG text chunk (non-strings as JSON; a lone
    surrogate, from a prompt with an undecodable byte, as U+FFFD)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        info.add_text(str(key), without_lone_surrogates(text))
    tmp = path.with_name(path.name + ".tmp")
    make_grid(images, cols).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The ``python -m training.sample`` / ``altforge generate`` arguments."""
    p = ArgumentParser(prog="altforge generate", description="Generate images from a pipeline folder.")
    p.add_argument("model_dir", help="pipeline folder (model_index.json, unet/, vae/, scheduler/, text_encoder/)")
    p.add_argument("prompt")
    p.add_argument("--negative", default=None, help="negative prompt: replaces the unconditional branch")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--guidance-interval",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="guide only at timesteps LO..HI of the 0..999 schedule (e.g. 200 999); default: every step",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("-n", "--num-images", type=int, default=4)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cols", type=int, default=None, help="images per grid row (default: about square)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    p.add_argument("--out", required=True, help="PNG file to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: generate a grid for one prompt and write it as a PNG with its settings in the metadata."""
    from training.models.pipeline import load_pipeline

    args = parse_args(argv)
    try:
        if args.cols is not None and args.cols < 1:
            raise ValueError(f"--cols must be >= 1, got {args.cols}")
        check_seeds(args.seed, args.num_images)  # before the model loads
        out = Path(args.out)
        if out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
            raise ValueError(f"--out {args.out}: give a PNG file path whose parent folders can be created")
        pipe = load_pipeline(args.model_dir, device=args.device)
        settings = {"negative": args.negative, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                    "n": args.num_images, "scheduler": args.scheduler, "precision": args.precision,
                    "guidance_interval": args.guidance_interval}  # fmt: skip
        images = generate(pipe, [args.prompt], batch_size=args.batch_size, **settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = grid_meta([args.prompt], model=args.model_dir, **settings)
    try:
        out = save_grid(images, args.out, meta, args.cols)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
