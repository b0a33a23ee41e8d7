"""Latent diffusion training throughput: the tiny loop on CPU (samples/s, data wait), or an SD-1.x U-Net step on a GPU.

    python benchmarks/train_ldm_throughput.py                         # tiny U-Net, 8x8x4 latents, CPU, 1 thread
    python benchmarks/train_ldm_throughput.py --gpu                   # SD-1.x U-Net, 32x32x4 latents, bf16, images/s
    python benchmarks/train_ldm_throughput.py --gpu --config small --device cpu --steps 2 --batch-size 2   # smoke
    python benchmarks/train_ldm_throughput.py --config sd15 --device cuda --latent-side 32 --text-shape 77 768 \
        --batch-size 128 --workers 6 --samples 6000 --steps 40    # the whole loop (loader, pinned memory) on a GPU

CPU mode writes synthetic latent shards (random latents and text embeddings in the shard format of
pipeline/latents.py), runs ``training.train_ldm.train`` for ``--steps`` steps through the streaming loader, and
reports the mean of the logged windows after the first (warm-up): samples/s, steps/s and the data-wait fraction.
In the same run, on the same shards, it runs the loop a user would otherwise write, after diffusers'
``train_text_to_image`` example (``plain_diffusers``): a torch DataLoader over the shards with webdataset
(``--workers`` processes, same batch), ``UNet2DConditionModel.from_config`` with the same config,
``DDPMScheduler.add_noise``, the U-Net forward under the same precision, MSE to the noise, AdamW, gradient clipping
at 1.0 and diffusers' ``EMAModel`` (the example's ``--use_ema``; altforge keeps an EMA too), timed after its first
``--log-every`` steps; ``vs_plain_diffusers`` is altforge's samples/s over the plain loop's.
On the CPU it also times the bare U-Net step (no loader) with and without channels_last. ``--device cuda`` runs the
same loop on a GPU (bf16 autocast, pinned host memory), with ``--latent-side``/``--text-shape`` for SD-sized
samples, so the data wait at GPU speed is measured rather than assumed.

GPU mode times the loop's training step on synthetic device tensors: the same U-Net, noising, loss, AdamW,
gradient clipping and EMA update as train_ldm, under bf16 autocast, channels_last, PyTorch SDPA attention, with
``--compile`` optional. 32x32x4 latents are 256 px images through the 8x VAE; text states are (77, 768) like
SD 1.x. Figure to beat: MosaicML's ~137 images/s per A100 for SD2 at 256 px (which also ran the VAE and text
encoder online; our latents and embeddings are precomputed by the latent stage); target >= 300 images/s on an H100.
The loader's share on a GPU run shows as ``data_wait`` in train_ldm's own logs. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.latents import write_empty_embedding  # noqa: E402
from pipeline.manifest import build_manifest, write_manifest  # noqa: E402
from pipeline.shards import ShardWriter, shard_urls  # noqa: E402
from pipeline.stats import StageStats  # noqa: E402
from training.distributed import fast_cuda_settings  # noqa: E402
from training.loop import resolve_precision  # noqa: E402
from training.models.pipeline import default_scheduler_config  # noqa: E402
from training.models.unet import build_unet, count_parameters, unet_config  # noqa: E402
from training.objectives import add_noise, alphas_cumprod, diffusion_loss, scaled_linear_betas  # noqa: E402
from training.train_ldm import LdmTrainConfig, ema_update, param_groups, train  # noqa: E402


def write_synthetic_latents(dst: str, n: int, shape=(4, 8, 8), text=(16, 32), per_shard: int = 2000) -> None:
    """Random float16 latents and text embeddings as latent shards, with the empty embedding and a manifest."""
    rng = np.random.default_rng(0)
    for index, start in enumerate(range(0, n, per_shard)):
        stats = StageStats()
        with ShardWriter(dst, index) as w:
            for i in range(start, min(n, start + per_shard)):
                w.write(
                    {
                        "__key__": f"k{i:08d}",
                        "latent.npy": rng.standard_normal(shape, dtype=np.float32).astype(np.float16),
                        "text_emb.npy": rng.standard_normal(text, dtype=np.float32).astype(np.float16),
                        "txt": "a red circle",
                    }
                )
                stats.seen += 1
                stats.kept += 1
            w.publish(stats)
    write_manifest(dst, build_manifest(dst, "encode", {"scaling_factor": 1.0, "latent_shape": list(shape)}))
    write_empty_embedding(dst, np.zeros(text, np.float32))


def plain_loader(data: str, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """What a user writes with webdataset and torch: shards -> shuffle -> .npy decode -> DataLoader batches."""
    import webdataset as wds

    ds = (
        wds.WebDataset(sorted(shard_urls(data)), resampled=True, shardshuffle=False)  # endless: steps decide
        .shuffle(1000)
        .decode()
        .to_tuple("latent.npy", "text_emb.npy")
    )
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def plain_diffusers_rate(data: str, config: str, shape, text, args, device: torch.device, precision: str) -> dict:
    """Samples/s and data wait of the diffusers-example training loop over ``data``, after ``--log-every`` steps."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config(config, text[1], shape[-1])).to(device).train()
    ema = EMAModel(unet.parameters(), decay=0.999)
    noise_scheduler = DDPMScheduler.from_config(default_scheduler_config("epsilon"))
    defaults = LdmTrainConfig(data=data, out="")
    opt = torch.optim.AdamW(
        unet.parameters(), lr=defaults.lr, betas=defaults.betas, weight_decay=defaults.weight_decay
    )
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    batches = iter(plain_loader(data, args.batch_size, args.workers))
    t0, waited = None, 0.0
    for step in range(args.steps):
        if step == args.log_every:  # the first window is warm-up, as for the trainer
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, waited = time.perf_counter(), 0.0
        t_data = time.perf_counter()
        latents, emb = next(batches)
        waited += time.perf_counter() - t_data
        latents = latents.to(device, non_blocking=True).float()
        emb = emb.to(device, non_blocking=True).float()
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = unet(noisy, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        ema.step(unet.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"samples_per_s": (args.steps - args.log_every) * args.batch_size / seconds, "data_wait": waited / seconds}


def bare_step_rate(
    config: str,
    batches: list[int],
    shape,
    text,
    steps: int,
    device: str,
    channels_last: bool,
    precision: str = "fp32",
    compile_model: bool = False,
) -> tuple[dict[int, float | None], dict[int, float], int]:
    """Training steps/s and peak GPU memory (GiB, CUDA only) per batch size of the U-Net alone on synthetic device
    tensors (the train_ldm step without the loader), and the U-Net's parameter count. The model, EMA and optimizer
    are built once for all sizes; a size that runs out of memory gets None and ends the sweep."""
    dev = torch.device(device)
    if dev.type == "cuda":
        fast_cuda_settings()  # what init_distributed sets for the training loop
    torch.manual_seed(0)
    unet = build_unet(config, cross_attention_dim=text[1], sample_size=shape[-1]).to(dev)
    if not channels_last:
        unet = unet.to(memory_format=torch.contiguous_format)
    ema = build_unet(config, cross_attention_dim=text[1], sample_size=shape[-1]).to(dev).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(param_groups(unet, 0.01), lr=1e-4, fused=True)  # as train_ldm (CPU and CUDA)
    abar = alphas_cumprod(scaled_linear_betas()).float().to(dev)
    model = torch.compile(unet) if compile_model else unet
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(x0, emb) -> None:
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],), device=dev)
        noisy = add_noise(x0, noise, t, abar)
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            pred = model(noisy, t, encoder_hidden_states=emb).sample
        loss, _ = diffusion_loss(pred, x0, noise, t, abar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, 0.999)

    rates, peaks = {}, {}
    warm = 3 if compile_model or dev.type == "cuda" else 1
    for batch in sorted(batches):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the peak reported is this size's
        try:
            x0 = torch.randn(batch, *shape, device=dev)
            emb = torch.randn(batch, *text, device=dev)
            for _ in range(warm):
                step(x0, emb)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(x0, emb)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rates[batch] = steps / (time.perf_counter() - t0)
            if dev.type == "cuda":
                peaks[batch] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError:  # report it and stop: larger batches will not fit either
            rates[batch] = None
            break
    return rates, peaks, count_parameters(unet)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line of results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the SD-1.x step on 32x32x4 latents in bf16 (images/s)")
    p.add_argument("--config", default=None, help="U-Net config (default: tiny on CPU, sd15 with --gpu)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 (CPU), 128 (--gpu)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="--gpu: several, one model build")
    p.add_argument("--steps", type=int, default=None, help="default: 60 (CPU loop), 20 (--gpu)")
    p.add_argument("--samples", type=int, default=8000, help="synthetic latents written (CPU mode)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default=None, help="default: cpu, or cuda with --gpu")
    p.add_argument("--precision", default=None, help="--gpu: bf16 (default) | fp16 | fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--latent-side", type=int, default=8, help="loop mode: side of the synthetic 4xSxS latents")
    p.add_argument("--text-shape", type=int, nargs=2, default=(16, 32), help="loop mode: (tokens, width) of the text")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.gpu:
        device = args.device or "cuda"
        config, steps = args.config or "sd15", args.steps or 20
        batches = args.batch_sizes or [args.batch_size or 128]
        precision = args.precision or ("bf16" if device.startswith("cuda") else "fp32")
        rates, peaks, n_params = bare_step_rate(
            config, batches, (4, 32, 32), (77, 768), steps, device, True, precision, args.compile
        )
        name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
        for batch, rate in rates.items():
            result = {
                "mode": "gpu_step",
                "config": config,
                "parameters": n_params,
                "device": name,
                "precision": precision,
                "compile": args.compile,
                "batch_size": batch,
                "latent": [4, 32, 32],
                "steps_per_s": round(rate, 3) if rate else None,
                "images_per_s": round(rate * batch, 1) if rate else None,
            }
            if rate is None:
                result["error"] = "out of memory"
            if batch in peaks:
                result["peak_gib"] = round(peaks[batch], 1)
            print(json.dumps(result), flush=True)
        return 0

    config, batch, steps = args.config or "tiny", args.batch_size or 64, args.steps or 60
    args.batch_size, args.steps = batch, steps
    if not 0 < args.log_every < steps:
        p.error("--log-every must be at least 1 and below --steps (its first window is the warm-up)")
    shape, text = (4, args.latent_side, args.latent_side), tuple(args.text_shape)
    device = args.device or "cpu"
    work = tempfile.mkdtemp(prefix="altforge-ldm-bench-")
    data = os.path.join(work, "latents")
    t0 = time.perf_counter()
    write_synthetic_latents(data, args.samples, shape, text, per_shard=min(2000, max(1, args.samples // 8)))
    print(f"wrote {args.samples} synthetic {shape} latents in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    cfg = LdmTrainConfig(
        data=data,
        out=os.path.join(work, "run"),
        config=config,
        steps=steps,
        batch_size=batch,
        warmup=max(1, steps // 10),
        workers=args.workers,
        log_every=args.log_every,
        save_every=0,
        device=device,
        threads=args.threads,
        compile=args.compile,
        progress=False,
    )
    gpu = device.startswith("cuda")
    precision = resolve_precision(cfg.precision, torch.device(device))
    try:
        logged = train(cfg)["train"]
        plain = plain_diffusers_rate(data, config, shape, text, args, torch.device(device), precision)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = logged[1:] or logged  # the first window holds the warm-up
    sps = statistics.mean(r["samples_per_s"] for r in rows)
    result = {
        "mode": "gpu_loop" if gpu else "cpu_loop",
        "config": config,
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": batch,
        "latent": list(shape),
        "text": list(text),
        "workers": args.workers,
        "samples_per_s": round(sps, 1),
        "steps_per_s": round(sps / batch, 2),
        "data_wait": round(statistics.mean(r["data_wait"] for r in rows), 4),
        "windows": len(rows),
        "precision": precision,
        "plain_diffusers_samples_per_s": round(plain["samples_per_s"], 1),
        "plain_diffusers_data_wait": round(plain["data_wait"], 4),
        "vs_plain_diffusers": round(sps / plain["samples_per_s"], 2),
        "load_avg": os.getloadavg()[0],
    }
    if not gpu:
        bare = {cl: bare_step_rate(config, [batch], shape, text, 20, "cpu", cl)[0][batch] for cl in (True, False)}
        result["bare_step_per_s_channels_last"] = round(bare[True], 2)
        result["bare_step_per_s_contiguous"] = round(bare[False], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
