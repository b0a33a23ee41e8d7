"""Why the latent stage exists: diffusion training steps/s fed from latent shards vs from JPEG shards (VAE and text
encoder run every step), side by side in one run. MosaicML measured encoding on the fly at 1.4x the cost.

    python benchmarks/latents_vs_jpeg.py                    # tiny VAE + tiny U-Net at 32 px, CPU
    python benchmarks/latents_vs_jpeg.py --threads 1 --steps 200

Both arms run the same U-Net training step (noising, epsilon loss, AdamW, clipping) at the same batch size through
the project's streaming loader (training/data.py) with the same number of DataLoader workers:

- **latents**: the shards ``altforge encode`` writes (``latent.npy`` + ``text_emb.npy``), what train_ldm reads;
- **jpeg**: the image shards (``jpg`` + ``txt``); every step decodes and crops the JPEGs in the loader, then runs
  the VAE encoder and the text encoder (frozen, ``inference_mode``) before the U-Net step.

The data (real demo scenes from training/synthetic.py) is encoded once first, untimed. A script, not a test.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.images import prepare_image  # noqa: E402
from pipeline.latents import EncodeConfig, Encoders, encode_latents_shard  # noqa: E402
from pipeline.shards import shard_files, shard_urls, write_sizes  # noqa: E402
from training.data import DataPosition, LoaderConfig, make_loader, make_plan  # noqa: E402
from training.models.clip import create_clip, export_open_clip, model_config  # noqa: E402
from training.models.text import load_text_encoder  # noqa: E402
from training.models.unet import build_unet  # noqa: E402
from training.models.vae import build_vae, encode_posterior  # noqa: E402
from training.objectives import add_noise, alphas_cumprod, diffusion_loss, scaled_linear_betas  # noqa: E402
from training.synthetic import write_demo_shards  # noqa: E402


def latent_item(sample: dict, rng: random.Random) -> dict:
    """Latent shard sample -> tensors."""
    load = functools.partial(np.load, allow_pickle=False)
    return {
        "latent": torch.from_numpy(load(io.BytesIO(sample["latent.npy"])).astype(np.float32)),
        "text_emb": torch.from_numpy(load(io.BytesIO(sample["text_emb.npy"])).astype(np.float32)),
    }


def jpeg_item(sample: dict, rng: random.Random, resolution: int) -> dict:
    """Image shard sample -> decoded, cropped image in [-1, 1] and its caption."""
    pixels, _ = prepare_image(sample["jpg"], resolution)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
    return {"image": image, "caption": sample["txt"].decode("utf-8")}


def run_arm(name, data, map_fn, to_inputs, unet, steps: int, batch: int, workers: int, seed: int) -> dict:
    """Train ``steps`` U-Net steps from ``data``; steps/s after a warm-up of 5 steps."""
    torch.manual_seed(seed)
    cfg = LoaderConfig(batch_size=batch, workers=workers, seed=seed, shuffle_buffer=256)
    loader = make_loader(make_plan(data, cfg, 1), cfg, 0, map_fn, DataPosition())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    abar = alphas_cumprod(scaled_linear_betas())
    it, t0, done = iter(loader), None, 0
    for step in range(steps + 5):
        if step == 5:
            t0 = time.perf_counter()
        latents, text = to_inputs(next(it))
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        noisy = add_noise(latents, noise, t, abar).contiguous(memory_format=torch.channels_last)
        pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss, _ = diffusion_loss(pred, latents, noise, t, abar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        done += step >= 5
    seconds = time.perf_counter() - t0
    return {"arm": name, "steps": done, "seconds": round(seconds, 2), "steps_per_s": round(done / seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    """Build the data, run both arms, print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (both arms)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="altforge-lvj-")
    try:
        print(json.dumps(compare(args, work), indent=1))
    finally:
        if not args.work:  # a --work directory is the user's to keep (and reuse: its images are not rewritten)
            shutil.rmtree(work, ignore_errors=True)
    return 0


def compare(args: argparse.Namespace, work: str) -> dict:
    """Build the data under ``work``, run both arms; the result row with the ratio."""
    images, latents, clip_dir = (os.path.join(work, d) for d in ("images", "latents", "clip"))
    if not os.path.exists(os.path.join(images, "sizes.json")):
        write_demo_shards(images, n=args.images, seed=3, size=args.resolution * 2, per_shard=1024)
    export_open_clip(create_clip("micro"), model_config("micro"), clip_dir)
    text = load_text_encoder(clip_dir, device="cpu")
    vae = build_vae("tiny").eval().requires_grad_(False)
    sf = 1.0  # the U-Net step does not care; both arms use the same
    encoders = Encoders(images=functools.partial(encode_posterior, vae), texts=text.encode, scaling_factor=sf)
    cfg = EncodeConfig(resolution=args.resolution, workers=0)
    sizes = {}
    for i, url in enumerate(sorted(shard_urls(images))):
        stats = encode_latents_shard(url, shard_files(latents, i)["tar"], cfg, encoders)
        sizes[f"{i:06d}.tar"] = stats.kept
    write_sizes(latents, None, sizes)

    def from_latents(batch):
        return batch["latent"].contiguous(memory_format=torch.channels_last), batch["text_emb"]

    @torch.inference_mode()
    def _encode(batch):
        mean, _ = encode_posterior(vae, batch["image"].contiguous(memory_format=torch.channels_last))
        return mean * sf, text.encode(list(batch["caption"]))

    def from_jpeg(batch):
        latent, emb = _encode(batch)
        return latent.clone(), emb.clone()  # leave inference mode for the U-Net's autograd

    unet_a = build_unet("tiny", cross_attention_dim=text.width, sample_size=args.resolution // 4)
    unet_b = build_unet("tiny", cross_attention_dim=text.width, sample_size=args.resolution // 4)
    unet_b.load_state_dict(unet_a.state_dict())
    common = {"steps": args.steps, "batch": args.batch_size, "workers": args.workers, "seed": 0}
    a = run_arm("latents", latents, latent_item, from_latents, unet_a, **common)
    jpeg_map = functools.partial(jpeg_item, resolution=args.resolution)
    b = run_arm("jpeg + VAE + text encoder every step", images, jpeg_map, from_jpeg, unet_b, **common)
    out = {
        "machine": f"{platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "arms": [a, b],
        "speedup_latents_over_jpeg": round(a["steps_per_s"] / b["steps_per_s"], 2),
    }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
