"""Latent-stage throughput: images/s of the demo VAE on CPU, or an SD-sized VAE on a GPU, and what bounds it.

    python benchmarks/encode_throughput.py                  # vae-tiny (random weights) at 32 px on the CPU
    python benchmarks/encode_throughput.py --gpu            # vae-sd (random weights) at 256 and 512 px, bf16

For each resolution it writes demo-site shards with training/synthetic.py (sources 1.25x the resolution, so the
resize is paid as it is on scraped images) and measures, separately:

- decode:     the DataLoader alone (JPEG decode, resize, crop, collate, pin) with ``--workers`` processes;
- transfer:   pinned uint8 batches to the GPU, the [-1, 1] conversion, and latents back (GPU only);
- compute:    the VAE encoder on batches already on the device (synchronised);
- end_to_end: ``encode_latents_shard`` over every shard (decode, VAE, float16 latents, tar + parquet writes).

``bound_by`` is the slowest of decode / transfer / compute. Random weights cost the same FLOPs as trained ones.

Then, in the same run and over the same shards, the stage with per-sample text embeddings (a random open_clip text
tower, ``--text-config``) against the loop a user would otherwise write with diffusers and PIL
(``plain_diffusers``): webdataset + PIL decode in a torch DataLoader with ``--workers`` processes, torchvision's
resize (bicubic), center crop, to-tensor and normalise (as diffusers' training examples), ``AutoencoderKL.encode``
(posterior mean x scaling factor) and the same text tower's per-token states, both in the same dtype and batch, the
results kept as one float16 .npz per shard. ``vs_plain_diffusers`` is the stage's images/s over the plain loop's.
A script, not a test: it prints one JSON line per resolution.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import shards  # noqa: E402
from pipeline.latent_images import decode_workers, image_batches, to_model_input  # noqa: E402
from pipeline.latents import EncodeConfig, Encoders, encode_latents_shard  # noqa: E402
from pipeline.stats import StageStats  # noqa: E402
from training.models import create_clip, get_tokenizer  # noqa: E402
from training.models.text import TextEncoder, token_states  # noqa: E402
from training.synthetic import write_demo_shards  # noqa: E402


def _one_shard(root: str, index: int, n: int, size: int) -> None:
    part = os.path.join(root, f"part{index}")
    write_demo_shards(part, n, seed=index, size=size, per_shard=n)  # keys carry the seed: unique across parts
    for suffix in (".tar", ".parquet", "_stats.json"):
        os.replace(os.path.join(part, f"000000{suffix}"), os.path.join(root, f"{shards.shard_name(index)}{suffix}"))


def demo_shards(root: str, n_shards: int, per_shard: int, size: int, processes: int) -> list[str]:
    """Render ``n_shards`` demo shards of ``size`` px images in parallel; returns their tar paths."""
    os.makedirs(root, exist_ok=True)
    with ProcessPoolExecutor(max(1, min(processes, n_shards))) as pool:
        list(pool.map(_one_shard, [root] * n_shards, range(n_shards), [per_shard] * n_shards, [size] * n_shards))
    return [os.path.join(root, f"{shards.shard_name(i)}.tar") for i in range(n_shards)]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings are wall time of finished work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(paths: list[str], cfg: EncodeConfig, device: torch.device) -> float:
    """Images/s of the DataLoader alone (the first batch, which pays the worker start, is not timed)."""
    n, t0 = 0, None
    for path in paths:
        for batch in image_batches(path, cfg, device):
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += batch["images"].shape[0]
    return n / max(time.perf_counter() - t0, 1e-9)


def first_batch(path: str, cfg: EncodeConfig, device: torch.device) -> torch.Tensor:
    """One full uint8 (B, H, W, 3) batch of decoded images, on the CPU."""
    return next(iter(image_batches(path, cfg, torch.device("cpu"))))["images"]


def measure_transfer(images: torch.Tensor, device: torch.device, dtype: torch.dtype, latent_ch: int, down: int, reps):
    """Images/s of host->device copies of a pinned batch, the [-1, 1] conversion, and latent-sized copies back."""
    pinned = images.pin_memory()
    b, h, w, _ = images.shape
    back = torch.empty(b, latent_ch, h // down, w // down, dtype=torch.float16, device=device)
    host = torch.empty(back.shape, dtype=torch.float16).pin_memory()
    to_model_input(pinned, device, dtype)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        to_model_input(pinned, device, dtype)
        host.copy_(back, non_blocking=True)
    sync(device)
    return reps * b / (time.perf_counter() - t0)


@torch.inference_mode()
def measure_compute(encode, images: torch.Tensor, device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """Images/s of the VAE encoder on a batch already on the device (after one warm-up call)."""
    x = to_model_input(images, device, dtype)
    encode(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        encode(x)
    sync(device)
    return reps * x.shape[0] / (time.perf_counter() - t0)


def measure_end_to_end(paths: list[str], dst: str, cfg: EncodeConfig, encoders: Encoders) -> tuple[float, dict]:
    """Images/s of the whole stage over every shard, and its summed per-phase timings."""
    total = StageStats()
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        total += encode_latents_shard(path, os.path.join(dst, f"{shards.shard_name(i)}.tar"), cfg, encoders)
    seconds = time.perf_counter() - t0
    return total.kept / seconds, {k: round(v, 2) for k, v in total.timings.items()}


def text_tower(name: str, device: torch.device) -> TextEncoder:
    """A random, frozen open_clip text tower of ``name`` (its image tower dropped) on ``device``."""
    model = create_clip(name, device).eval().requires_grad_(False)
    model.visual = None
    return TextEncoder(model=model, tokenizer=get_tokenizer(name), device=device, provenance={"model": name})


def _image_caption(sample: tuple, transform) -> tuple[torch.Tensor, str]:
    """(PIL image, caption) -> (normalised tensor, caption); module level so DataLoader workers can pickle it."""
    image, caption = sample
    return transform(image.convert("RGB")), caption


def plain_batches(path: str, resolution: int, batch_size: int, workers: int, pin: bool):
    """What a diffusers user writes: webdataset + PIL decode, torchvision resize/crop/normalise, DataLoader."""
    import webdataset as wds
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    ds = wds.WebDataset(path, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "txt")
    ds = ds.map(functools.partial(_image_caption, transform=transform))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=pin)


@torch.inference_mode()
def measure_plain(paths: list[str], dst: str, cfg: EncodeConfig, vae, text: TextEncoder, workers: int) -> float:
    """Images/s of the plain diffusers + PIL loop over every shard, writing one .npz of float16 arrays per shard."""
    os.makedirs(dst, exist_ok=True)
    n, t0 = 0, time.perf_counter()
    for i, path in enumerate(paths):
        latents, embs = [], []
        for images, captions in plain_batches(
            path, cfg.resolution, cfg.batch_size, workers, vae.device.type == "cuda"
        ):
            x = images.to(vae.device, vae.dtype, non_blocking=True)
            latents.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).half().cpu())
            tokens = text.tokenizer(list(captions)).to(text.device)
            embs.append(token_states(text.model, tokens).half().cpu())
            n += len(captions)
        np.savez(os.path.join(dst, f"{i:06d}.npz"), latents=torch.cat(latents).numpy(), text=torch.cat(embs).numpy())
    return n / (time.perf_counter() - t0)


def stage_vs_plain(args, paths: list[str], work: str, cfg: EncodeConfig, vae, text, device, dtype) -> dict:
    """The stage with text embeddings and the plain loop over the same shards: images/s of each and the ratio."""
    from training.models.vae import encode_posterior

    text.encode(["warm-up"])  # kernels and allocator, for both arms
    with_text = replace(cfg, store_text_embeddings=True)
    enc = Encoders(functools.partial(encode_posterior, vae), text.encode, float(vae.config.scaling_factor),
                   str(device), str(dtype).removeprefix("torch."))  # fmt: skip
    ours, _ = measure_end_to_end(paths, os.path.join(work, "stage_text"), with_text, enc)
    plain = measure_plain(paths, os.path.join(work, "plain"), cfg, vae, text, decode_workers(cfg, device))
    return {
        "text_config": args.text_config,
        "stage_with_text_images_per_s": round(ours, 1),
        "plain_diffusers_images_per_s": round(plain, 1),
        "vs_plain_diffusers": round(ours / plain, 2),
    }


def run_resolution(args, vae, text, resolution: int, work: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Every measurement at one resolution; returns the result row."""
    from training.models.vae import downsample_factor, encode_posterior

    per_shard = max(args.batch_size, args.images // args.shards)
    source = round(resolution * args.source_scale)
    t0 = time.perf_counter()
    paths = demo_shards(os.path.join(work, f"src{resolution}"), args.shards, per_shard, source, args.render_processes)
    render_s = time.perf_counter() - t0
    cfg = EncodeConfig(resolution, store_text_embeddings=False, batch_size=args.batch_size, workers=args.workers)
    encode = functools.partial(encode_posterior, vae)
    images = first_batch(paths[0], cfg, device)
    rates = {"decode": measure_decode(paths, cfg, device)}
    if device.type == "cuda":
        down = downsample_factor(dict(vae.config))
        rates["transfer"] = measure_transfer(images, device, dtype, vae.config.latent_channels, down, args.reps)
    rates["compute"] = measure_compute(encode, images, device, dtype, args.reps)
    enc = Encoders(encode, None, float(vae.config.scaling_factor), str(device), str(dtype).removeprefix("torch."))
    e2e, timings = measure_end_to_end(paths, os.path.join(work, f"lat{resolution}"), cfg, enc)
    versus = stage_vs_plain(args, paths, os.path.join(work, f"vs{resolution}"), cfg, vae, text, device, dtype)
    return {
        "resolution": resolution,
        "source_px": source,
        "images": per_shard * args.shards,
        "workers": decode_workers(cfg, device),
        "render_s": round(render_s, 1),
        **{f"{k}_images_per_s": round(v, 1) for k, v in rates.items()},
        "end_to_end_images_per_s": round(e2e, 1),
        "bound_by": min(rates, key=rates.get),
        "end_to_end_timings_s": timings,
        **versus,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line per resolution."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="SD-sized VAE at --resolutions (default 256 512) in --dtype")
    p.add_argument("--config", default=None, help="VAE config (default: tiny on CPU, sd with --gpu)")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="px (default: 32 CPU, 256 512 GPU)")
    p.add_argument("--images", type=int, default=None, help="images per resolution (default 2048 CPU, 4096 GPU)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default 64 CPU, 128 GPU")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default 0 CPU, 8 GPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="GPU only")
    p.add_argument(
        "--reps", type=int, default=None, help="timed batches for transfer/compute (default 10 CPU, 20 GPU)"
    )
    p.add_argument("--source-scale", type=float, default=1.25, help="source image side / resolution")
    p.add_argument("--render-processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--device", default=None, help="override (e.g. cpu to smoke-test --gpu's path)")
    p.add_argument("--text-config", default=None, help="open_clip text tower (default: micro CPU, ViT-L-14 GPU)")
    p.add_argument("--work", default=None, help="scratch directory, kept (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --gpu needs CUDA (use --device cpu to smoke-test the path)", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    args.config = args.config or ("sd" if args.gpu else "tiny")
    args.resolutions = args.resolutions or ([256, 512] if args.gpu else [32])
    args.images = args.images or (4096 if on_gpu else 2048)
    args.batch_size = args.batch_size or (128 if on_gpu else 64)
    args.reps = args.reps or (20 if on_gpu else 10)
    args.text_config = args.text_config or ("ViT-L-14" if on_gpu else "micro")
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    from training.models.vae import build_vae

    vae = build_vae(args.config).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    vae = vae.eval().requires_grad_(False)
    name = torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or platform.machine())
    text = text_tower(args.text_config, device)
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="altforge-encode-bench-")
    try:
        for r in args.resolutions:
            row = run_resolution(args, vae, text, r, work, device, dtype)
            row = {"vae": args.config, "device": name, "dtype": str(dtype).removeprefix("torch."),
                   "threads": torch.get_num_threads(), "batch_size": args.batch_size, **row}  # fmt: skip
            print(json.dumps(row), flush=True)
    finally:
        if not args.work:  # the rendered shards and every arm's output
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
