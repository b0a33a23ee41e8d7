"""Sampling throughput of ``training.sample.generate`` against a plain diffusers denoising loop: images/s, CPU or GPU.

    python benchmarks/sample_throughput.py                  # tiny U-Net + tiny VAE, 32 px, CPU fp32
    python benchmarks/sample_throughput.py --gpu            # SD-1.x U-Net + SD VAE at 256 px: fp32, bf16, fp16
    python benchmarks/sample_throughput.py --gpu --device cpu --unet tiny --vae tiny --resolution 32 --images 4

The models have random weights (the time of a step does not depend on them): a U-Net from
training/models/configs (``--unet``), a VAE (``--vae``), random (L, D) prompt embeddings and a random empty-prompt
embedding, assembled into an in-memory pipeline, so no text encoder or pipeline folder is needed. Each variant
generates ``--images`` images at ``--steps`` DPM-Solver++ steps and guidance 7.5 (two U-Net passes per step), in
batches of ``--batch-size``, and includes the VAE decode and the copy to uint8 on the CPU.

Two comparisons, in the same run. Per variant, the same model parts (same weights, dtype and autocast) also run
through the loop a user of diffusers would write by hand (``plain_diffusers``: ``DPMSolverMultistepScheduler``,
``set_timesteps``, the U-Net on the doubled batch with CFG, ``scheduler.step``, ``vae.decode``), timed the same way;
``vs_plain_diffusers`` is altforge's images/s over it. Across variants, ``speedup_vs_fp32`` is what half precision
buys against the fp32 variant, which runs in true fp32: TF32 is switched off for both matmuls and cuDNN convolutions
(PyTorch's default lets cuDNN convolutions use TF32) and restored afterwards. A script, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from training.models.pipeline import LdmPipeline, default_scheduler_config  # noqa: E402
from training.models.unet import build_unet, count_parameters  # noqa: E402
from training.models.vae import build_vae  # noqa: E402
from training.sample import autocast, generate, to_uint8  # noqa: E402

# (name, weight dtype, autocast precision)
VARIANTS = {
    "fp32": (torch.float32, "fp32"),
    "bf16": (torch.float32, "bf16"),  # fp32 weights, bf16 autocast (what `altforge generate` does on a GPU)
    "fp16": (torch.float32, "fp16"),
    "bf16-weights": (torch.bfloat16, "bf16"),  # weights cast to bf16 as well
}


def build_pipe(unet_cfg: str, vae_cfg: str, resolution: int, text: tuple[int, int], device, dtype) -> LdmPipeline:
    """A random pipeline of the given configs on ``device`` in ``dtype`` (eval, channels_last)."""
    torch.manual_seed(0)
    vae = build_vae(vae_cfg)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(unet_cfg, cross_attention_dim=text[1], sample_size=resolution // down)
    move = {"device": device, "dtype": dtype, "memory_format": torch.channels_last}
    return LdmPipeline(
        unet=unet.to(**move).eval().requires_grad_(False),
        vae=vae.to(**move).eval().requires_grad_(False),
        text_encoder=None,
        train_scheduler_config=default_scheduler_config("epsilon"),
        prediction_type="epsilon",
        resolution=resolution,
        empty_emb=torch.randn(*text, device=device),
    )


@contextlib.contextmanager
def true_fp32(on: bool):
    """TF32 off for CUDA matmuls and cuDNN convolutions while ``on`` (cuDNN's is on by default); restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if on:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def altforge_images(pipe, emb, steps: int, batch: int, precision: str) -> torch.Tensor:
    """``len(emb)`` images through ``training.sample.generate``."""
    kw = {"steps": steps, "guidance": 7.5, "batch_size": batch, "precision": precision}
    return generate(pipe, [""] * len(emb), text_emb=emb, **kw)


@torch.inference_mode()
def plain_diffusers_images(pipe, emb, steps: int, batch: int, precision: str) -> torch.Tensor:
    """``len(emb)`` images through the denoising loop a diffusers user writes by hand, on the same model parts."""
    unet, vae, device = pipe.unet, pipe.vae, pipe.device
    sched = DPMSolverMultistepScheduler.from_config(pipe.train_scheduler_config)  # DPM-Solver++ 2M by default
    gen = torch.Generator().manual_seed(0)
    out = []
    for b in range(0, len(emb), batch):
        cond = emb[b : b + batch].to(device)
        uncond = pipe.empty_emb.expand_as(cond)
        text = torch.cat([uncond, cond]).to(unet.dtype)
        sched.set_timesteps(steps, device=device)
        latents = torch.randn((len(cond), *pipe.latent_shape), generator=gen).to(device) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t).to(unet.dtype)
            with autocast(device, precision):
                noise_u, noise_c = unet(x, t, encoder_hidden_states=text).sample.float().chunk(2)
            latents = sched.step(noise_u + 7.5 * (noise_c - noise_u), t, latents).prev_sample
        with autocast(device, precision):
            images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        out.append(to_uint8(images))
    return torch.cat(out)


def time_variant(make_images, pipe, emb, steps: int, batch: int, precision: str) -> float:
    """Seconds ``make_images`` takes for ``len(emb)`` images (after a one-batch warm-up)."""
    make_images(pipe, emb[:batch], steps, batch, precision)  # warm-up: kernels, allocator
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = make_images(pipe, emb, steps, batch, precision)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape[0] == len(emb)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Run every variant (altforge and plain diffusers) and print one JSON line each, then the ratios to fp32."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="SD-1.x U-Net + SD VAE at 256 px on CUDA")
    p.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    p.add_argument("--unet", default=None, help="U-Net config (default: sd15 with --gpu, else tiny)")
    p.add_argument("--vae", default=None, help="VAE config (default: sd with --gpu, else tiny)")
    p.add_argument("--resolution", type=int, default=None, help="px (default: 256 with --gpu, else 32)")
    p.add_argument("--images", type=int, default=None, help="images per variant (default: 256 GPU, 32 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 GPU, 16 CPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: all on a GPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    unet_cfg, vae_cfg = args.unet or ("sd15" if args.gpu else "tiny"), args.vae or ("sd" if args.gpu else "tiny")
    res = args.resolution or (256 if args.gpu else 32)
    n, batch = args.images or (256 if args.gpu else 32), args.batch_size or (64 if args.gpu else 16)
    text = (77, 768) if unet_cfg == "sd15" else (16, 32)
    variants = args.variants or (list(VARIANTS) if device.type == "cuda" else ["fp32"])
    emb = torch.randn(n, *text, generator=torch.Generator().manual_seed(1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rates = {}
    for v in variants:
        dtype, precision = VARIANTS[v]
        pipe = build_pipe(unet_cfg, vae_cfg, res, text, device, dtype)
        with true_fp32(precision == "fp32"):
            seconds = time_variant(altforge_images, pipe, emb, args.steps, batch, precision)
            plain_seconds = time_variant(plain_diffusers_images, pipe, emb, args.steps, batch, precision)
        rates[v] = n / seconds
        row = {
            "variant": v,
            "device": name,
            "unet": unet_cfg,
            "unet_parameters": count_parameters(pipe.unet),
            "vae": vae_cfg,
            "resolution": res,
            "steps": args.steps,
            "guidance": 7.5,
            "batch_size": batch,
            "images": n,
            "seconds": round(seconds, 2),
            "images_per_s": round(rates[v], 2),
            "unet_evals_per_s": round(rates[v] * 2 * args.steps, 1),
            "plain_diffusers_seconds": round(plain_seconds, 2),
            "plain_diffusers_images_per_s": round(n / plain_seconds, 2),
            "vs_plain_diffusers": round(plain_seconds / seconds, 2),
        }
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        print(json.dumps(row), flush=True)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "fp32" in rates:
        print(json.dumps({"speedup_vs_fp32": {v: round(r / rates["fp32"], 2) for v, r in rates.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
