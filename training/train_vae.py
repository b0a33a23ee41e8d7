"""Image autoencoder (AutoencoderKL) training on shards: one process, or DDP under torchrun. Reads top to bottom.

python -m training.train_vae DATA --out RUN [--config tiny] [--resolution 32] [--steps N] [--eval-data HELDOUT]
torchrun --nproc-per-node 8 -m training.train_vae DATA --out RUN --config sd --resolution 256 --batch-size 16

Loss: L1 (or MSE) reconstruction of a sample from the posterior, plus a small KL term towards N(0, I) that keeps
the latent space smooth (Rombach et al. 2022, "KL-reg"). No perceptual or adversarial term: the LPIPS/VGG weights
such a term needs are not available offline. At the end the scaling factor 1 / std of the posterior-mean latents is
computed over training images and stored in the model config, and the diffusers folder is written at the top of
``out`` so ``AutoencoderKL.from_pretrained(out)`` loads it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.images import prepare_image
from pipeline.shards import first_image, iter_samples, shard_urls
from pipeline.storage import redact_secrets
from training import distributed, loop
from training.checkpoint import latest_checkpoint, read_state, resume_loop, save_checkpoint
from training.data import DataPosition, LoaderConfig, make_loader, make_plan, plan_fingerprint
from training.models.vae import (
    build_vae,
    downsample_factor,
    encode_posterior,
    heldout_psnr,
    latent_scaling_factor,
    reconstruct,
    save_vae,
    vae_config,
)
from training.objectives import vae_loss


@dataclass(frozen=True)
class VaeTrainConfig:
    """Everything a VAE run needs; saved as train_config.json in the run directory."""

    data: str  # image shards: dataset dir, manifest.json or brace pattern
    out: str  # run directory: the diffusers VAE folder itself, plus checkpoints/, tensorboard/, metrics.json
    config: str = "tiny"  # architecture: training/models/configs/vae-NAME.json, or a JSON path
    resolution: int = 32  # pixels, square training image side (shorter side resized, then center crop)
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # images per rank per step
    lr: float = 2e-3  # peak learning rate (the tiny demo VAE; an SD-sized one wants ~1e-4)
    min_lr: float = 0.0  # learning rate at the end of the cosine
    warmup_steps: int = 100  # linear warm-up, optimizer steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    loss: str = "l1"  # reconstruction loss: "l1" | "mse" (per pixel, images in [-1, 1])
    kl_weight: float = 1e-6  # weight of the KL term (summed over the latent, per image pixel element, as in SD)
    perceptual_weight: float = 0.0  # must stay 0: no perceptual network (LPIPS/VGG weights) is available offline
    # decoder robustness: each image's latent gets extra Gaussian noise of std u * latent_noise * (the batch's
    # posterior-mean std), u ~ U(0, 1), before decoding, so the decoder draws the same image for nearby latents
    # and a diffusion model's small latent errors do not blur shapes; 0 = off
    latent_noise: float = 0.0
    precision: str = "auto"  # auto (bf16 on GPU if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cuda | cpu
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # samples per worker
    cache_mb: int = 256  # undecoded samples each loading process keeps in memory for later epochs; 0 = none
    split: str = "shard"  # "shard" or "sample" (see training.data)
    seed: int = 0
    log_every: int = 10  # steps between log lines; 0 = only at the end
    save_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    sample_every: int = 500  # steps between reconstruction grids and held-out PSNR; 0 = only at the end
    sample_images: int = 8  # images in the reconstruction grid (the first of eval_data, else of data)
    eval_data: str | None = None  # held-out image shards for PSNR
    eval_limit: int = 256  # held-out images used for PSNR
    scale_samples: int = 1024  # training images (in shard order) whose latents set the scaling factor
    resume: str = "auto"  # "auto" (latest checkpoint in out), "none", or a checkpoint directory
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    budget_schedule: bool = False  # with max_minutes: end the cosine at the time box if that comes first
    stop_after: int = 0  # leave (and save) at this step although the schedule runs to ``steps``; 0 = off
    threads: int = 0  # torch CPU threads; 0 = torch's default
    progress: bool = True  # progress bar when stderr is a terminal
    storage_options: dict | None = None  # fsspec options for remote shards (plan, eval and scaling reads)

    def __post_init__(self):
        loop.check_choices(self)
        if self.loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {self.loss!r}")
        if self.perceptual_weight != 0:
            raise ValueError("perceptual_weight must be 0: no perceptual network (LPIPS/VGG) is available offline")
        if self.resolution < 8 or self.steps < 0 or self.batch_size < 1:
            raise ValueError("resolution must be >= 8, steps >= 0, batch_size >= 1")
        if self.latent_noise < 0:
            raise ValueError(f"latent_noise must be >= 0, got {self.latent_noise}")
        at_least = {"sample_images": 1, "eval_limit": 1, "scale_samples": 2, "keep_checkpoints": 1}
        at_least.update(dict.fromkeys(("log_every", "save_every", "sample_every", "stop_after", "workers"), 0))
        at_least.update(dict.fromkeys(("warmup_steps", "threads", "shuffle_buffer", "cache_mb"), 0))
        bad = [f"{k} = {getattr(self, k)} (needs >= {v})" for k, v in at_least.items() if getattr(self, k) < v]
        bad += loop.float_settings_out_of_range(
            self,
            positive=("lr",),
            non_negative=("min_lr", "weight_decay", "grad_clip", "kl_weight", "latent_noise", "max_minutes"),
        )
        if bad:
            raise ValueError(f"settings out of range: {', '.join(bad)}")

    def to_json(self) -> str:
        """The config as JSON, without the credentials of its storage options."""
        return json.dumps(redact_secrets(asdict(self)), indent=2)

    @classmethod
    def from_json(cls, text: str) -> VaeTrainConfig:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------------- images


def image_tensor(sample: dict, resolution: int) -> torch.Tensor:
    """The first image field of a raw sample as a (3, r, r) float32 tensor in [-1, 1] (KeyError if none)."""
    data = first_image(sample)
    if data is None:
        raise KeyError("no image field")
    pixels, _ = prepare_image(data, resolution)  # shorter side to resolution (bicubic), center crop
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0


def vae_map(sample: dict, rng: random.Random, resolution: int) -> dict[str, torch.Tensor]:
    """Raw shard sample -> {"image": (3, r, r) in [-1, 1]} for :mod:`training.data` (no augmentation)."""
    return {"image": image_tensor(sample, resolution)}


def image_batches(
    source: str,
    resolution: int,
    limit: int,
    batch_size: int,
    errors: Counter | None = None,
    storage_options: dict | None = None,
) -> Iterator[torch.Tensor]:
    """The first ``limit`` images of ``source`` in shard order, preprocessed, in batches; bad samples counted."""
    errors = Counter() if errors is None else errors
    buf: list[torch.Tensor] = []
    n = 0
    for url in sorted(shard_urls(source, storage_options)):
        for sample in iter_samples(url, storage_options, decode=False, errors=errors):
            try:
                buf.append(image_tensor(sample, resolution))
            except KeyError:
                errors["missing_field"] += 1
                continue
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                errors["decode_error"] += 1
                continue
            n += 1
            if len(buf) == batch_size or n == limit:
                yield torch.stack(buf)
                buf = []
            if n == limit:
                return
    if buf:
        yield torch.stack(buf)


# ------------------------------------------------------------------------------------------------------- loss


class _Autoencode(torch.nn.Module):
    """Encode, draw a reparameterised posterior sample, decode: the training forward as one module for DDP."""

    def __init__(self, vae: torch.nn.Module, latent_noise: float = 0.0):
        super().__init__()
        self.vae = vae
        self.latent_noise = latent_noise

    def forward(self, images: torch.Tensor, generator: torch.Generator):
        mean, logvar = encode_posterior(self.vae, images)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        z = mean.float() + torch.exp(0.5 * logvar.float()) * noise
        if self.latent_noise > 0:  # relative to the latents' own scale, so the encoder cannot outgrow it
            level = torch.rand((len(z), 1, 1, 1), generator=generator, device=z.device) * self.latent_noise
            extra = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
            z = z + level * mean.detach().float().std() * extra
        return self.vae.decode(z.to(mean.dtype)).sample, mean, logvar


def noise_seed(seed: int, step: int, world_size: int, rank: int) -> int:
    """The posterior-noise seed of one (step, rank): stateless, so a resumed run draws the same noise."""
    return (seed << 32) + step * world_size + rank


# ------------------------------------------------------------------------------------------------------ train


def train(cfg: VaeTrainConfig) -> dict:
    """Run (or resume) training; returns the metrics written to ``out/metrics.json``."""
    dist = distributed.init_distributed(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = loop.run_dir(cfg.out)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)

    # ---- model, optimizer, precision
    vae = build_vae(cfg.config).to(dist.device, memory_format=torch.channels_last)
    down = downsample_factor(vae.config)
    if cfg.resolution % down:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of this VAE's {down}x downsampling")
    precision = loop.resolve_precision(cfg.precision, dist.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    generator = torch.Generator(device=dist.device)

    # ---- data
    loader_cfg = LoaderConfig.of(cfg)
    plan = make_plan(cfg.data, loader_cfg, dist.world_size, cfg.storage_options)
    data_plan = plan_fingerprint(plan, loader_cfg)  # saved with every checkpoint
    position = DataPosition()

    # ---- resume
    step, history = 0, {"train": [], "eval": []}
    train_seconds = 0.0
    arch = json.loads(json.dumps(vae_config(cfg.config)))  # as a checkpoint's state.json holds it
    ckpt = latest_checkpoint(out) if cfg.resume == "auto" else (None if cfg.resume == "none" else Path(cfg.resume))
    if ckpt is not None:
        saved = read_state(ckpt)  # another architecture (even one of the same tensor shapes) is refused in one line
        if saved.get("model_config", arch) != arch:
            raise ValueError(
                f"{ckpt} holds a VAE of another architecture (--config {saved['config']['config']}) than --config "
                f"{cfg.config}: start over with --resume none, or use another --out"
            )
        doc, step, history, train_seconds = resume_loop(ckpt, vae, optimizer, scaler)
        position, same_layout = DataPosition.resumed(doc, dist.rank, dist.world_size, cfg.workers, data_plan)
        if dist.is_main:
            print(
                f"resumed from {ckpt} at step {step}" + ("" if same_layout else f" (data from epoch {position.epoch})")
            )
    model = autoencode = _Autoencode(vae, cfg.latent_noise)
    watch, last_images = loop.DivergenceWatch(dist.device, not scaler.is_enabled(), start_step=step), []

    def probe() -> torch.Tensor | None:  # the loss of the current weights on the last batch (a fixed noise draw)
        def loss() -> torch.Tensor:
            recon, mean, logvar = autoencode(last_images[0], torch.Generator(dist.device).manual_seed(0))
            return vae_loss(recon, last_images[0], mean, logvar, cfg.loss)[0]

        return loop.probe_loss(vae, dist.device, amp_dtype, loss) if last_images else None

    if dist.distributed:
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    loader = make_loader(plan, loader_cfg, dist.rank, functools.partial(vae_map, resolution=cfg.resolution), position)
    batches = iter(loader)

    # ---- logging, reconstruction grids and held-out PSNR (rank 0)
    writer = None
    grid_images = None
    read_errors: Counter = Counter()  # bad samples met while reading the grid and scaling images
    eval_errors: Counter = Counter()  # ... and the held-out images, as the last evaluation met them (each re-reads)
    with distributed.main_checks(dist.device):
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=step if step else None)
            (out / "train_config.json").write_text(cfg.to_json(), encoding="utf-8")
            grid_source = cfg.eval_data or cfg.data
            first = image_batches(
                grid_source, cfg.resolution, cfg.sample_images, cfg.sample_images, read_errors, cfg.storage_options
            )
            grid_images = next(first, None)
            if grid_images is None:
                raise ValueError(f"no readable images in {grid_source}")

    def run_eval() -> float | None:
        """Log a reconstruction grid and the held-out PSNR; returns the PSNR (None without eval_data)."""
        watch.check(step, cfg.lr, probe)  # no held-out PSNR or grid of diverged weights
        value = None
        on = {"eval_data": cfg.eval_data, "eval_limit": cfg.eval_limit, "resolution": cfg.resolution}
        done = history["eval"][-1] if history["eval"] else None
        if done is not None and done["step"] == step and {k: done.get(k) for k in on} == on:
            distributed.barrier()  # a relaunch of a finished run: evaluated already, on the same images
            return done["psnr"]
        if dist.is_main:
            vae.eval()
            recon = reconstruct(vae, grid_images)
            grid = torch.cat([grid_images, recon]).add(1).div(2).clamp(0, 1)
            writer.add_image("reconstructions/top_input_bottom_output", _grid(grid, len(grid_images)), step)
            if cfg.eval_data:
                eval_errors.clear()
                held = image_batches(
                    cfg.eval_data, cfg.resolution, cfg.eval_limit, cfg.batch_size, eval_errors, cfg.storage_options
                )
                value, n = heldout_psnr(vae, held)
                history["eval"].append(
                    {"step": step, "psnr": value, "images": n, "train_seconds": round(train_seconds, 2), **on}
                )
                writer.add_scalar("eval/psnr", value, step)
                print(f"eval step {step}: held-out PSNR {value:.2f} dB on {n} images", flush=True)
            vae.train()
        distributed.barrier()
        return value

    def save() -> None:
        watch.check(step, cfg.lr, probe)  # the update after the last finite loss may be the one that diverged
        data = distributed.all_gather_object(position.to_dict())
        if dist.is_main:
            state = {
                "config": asdict(cfg),
                "scheduler": {
                    "step": step,
                    "lr": loop.scheduled_lr(cfg, max(0, step - 1), train_seconds, cfg.warmup_steps),
                },
                "scaler": scaler.state_dict(),
                "data": data,
                "world_size": dist.world_size,
                "workers": cfg.workers,
                "steps_per_epoch": plan.steps_per_epoch,
                "data_plan": data_plan,
                "metrics": history,
                "train_seconds": train_seconds,
                "model_config": arch,  # a resume with another architecture is refused before loading weights
            }
            save_checkpoint(out, step, vae, optimizer, state, cfg.keep_checkpoints)
        distributed.barrier()

    def new_window() -> dict:
        zero = torch.zeros((), device=dist.device)
        return {"t": time.perf_counter(), "data": 0.0, "steps": 0, "loss": zero, "rec": zero, "kl": zero, "mse": zero}

    global_batch = cfg.batch_size * dist.world_size
    bar = tqdm(total=cfg.steps, initial=step, disable=not (dist.is_main and cfg.progress) or None, unit="step")
    window = new_window()
    model.train()
    stop = loop.stop_before_start(cfg, step, train_seconds, dist.is_main)  # a relaunch of a run that got there
    while step < cfg.steps and not stop:
        t_step = time.perf_counter()
        lr = loop.scheduled_lr(cfg, step, train_seconds, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        t_data = time.perf_counter()
        batch = position.advance(next(batches))
        window["data"] += time.perf_counter() - t_data
        images = batch["image"].to(dist.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        last_images[:] = [images]
        generator.manual_seed(noise_seed(cfg.seed, step, dist.world_size, dist.rank))
        autocast = torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        with autocast:
            recon, mean, logvar = model(images, generator)
            rec, kl = vae_loss(recon, images, mean, logvar, cfg.loss)
            loss = rec + cfg.kl_weight * kl
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        if not torch.isfinite(loss.detach()):  # diverged: stop before NaN weights reach a checkpoint
            raise ValueError(f"step {step + 1}: the loss is {float(loss.detach()):g}; lower --lr (now {cfg.lr:g})")
        scaler.step(optimizer)
        scaler.update()
        window["loss"] = window["loss"] + loss.detach()
        window["rec"] = window["rec"] + rec.detach()
        window["kl"] = window["kl"] + kl.detach()
        window["mse"] = window["mse"] + (recon.detach().float().clamp(-1, 1) - images).pow(2).mean()
        step += 1
        window["steps"] += 1
        train_seconds += time.perf_counter() - t_step
        bar.update(1)
        if dist.distributed and cfg.max_minutes > 0:  # rank 0's clock, for the stop and the schedule alike
            train_seconds = distributed.main_value(train_seconds, dist.device)
        stop = loop.reached_stop(cfg, step, train_seconds)

        if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps or stop:
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window["t"]
            n = window["steps"]
            mse = distributed.mean_over_ranks(float(window["mse"]) / n, dist.device)
            row = {
                "step": step,
                "loss": distributed.mean_over_ranks(float(window["loss"]) / n, dist.device),
                "rec_loss": distributed.mean_over_ranks(float(window["rec"]) / n, dist.device),
                "kl": distributed.mean_over_ranks(float(window["kl"]) / n, dist.device),
                "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),  # training batches, sampled latents; dB
                "lr": lr,
                "samples_per_s": global_batch * n / elapsed,
                "data_wait": window["data"] / elapsed,  # fraction of step time spent waiting for batches
                "train_seconds": round(train_seconds, 2),
            }
            history["train"].append(row)
            if dist.is_main:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("data/errors", sum(position.errors.values()), step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.1f}")
                loop.write_json(out / "metrics.json", {"config": asdict(cfg), "step": step, **history})
                if bar.disable:  # no terminal: one log line per window instead of the bar
                    print(" ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
            window = new_window()
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps and not stop:
            run_eval()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps and not stop:
            save()
        if stop:
            break
    bar.close()

    # ---- the end: evaluate, checkpoint, scaling factor, the diffusers folder at the top of out
    final_psnr = run_eval()
    save()
    errors = distributed.all_gather_object(dict(position.errors))
    result = {"config": asdict(cfg), "step": step, "train_seconds": round(train_seconds, 2), **history}
    result["data_errors"] = dict(sum((Counter(e) for e in errors), start=Counter()))
    if dist.is_main:
        vae.eval()
        scale_images = image_batches(
            cfg.data, cfg.resolution, cfg.scale_samples, cfg.batch_size, read_errors, cfg.storage_options
        )
        factor, std, n_latent = latent_scaling_factor(vae, scale_images)
        vae.register_to_config(scaling_factor=factor)
        save_vae(vae, out)
        result.update(
            psnr=final_psnr,  # dB, mean per-image PSNR on eval_data (None without it)
            psnr_images=history["eval"][-1]["images"] if final_psnr is not None else 0,
            scaling_factor=factor,
            latent_std=std,
            latent_elements=n_latent,
            read_errors=dict(read_errors + eval_errors),
        )
        loop.write_json(out / "metrics.json", result)
        writer.close()
        if result["data_errors"] or result["read_errors"]:
            print(f"skipped samples: {result['data_errors']} {result['read_errors']}")
        print(f"scaling factor {factor:.5f} (latent std {std:.4f}); saved the VAE to {out}", flush=True)
    distributed.barrier()
    distributed.cleanup()
    return result


def _grid(images: torch.Tensor, ncol: int) -> torch.Tensor:
    """(2n, 3, H, W) in [0, 1] -> one (3, 2H, nW) image: inputs on top, reconstructions below."""
    top, bottom = images[:ncol], images[ncol:]
    return torch.cat([torch.cat(list(top), dim=2), torch.cat(list(bottom), dim=2)], dim=1)


def parse_args(argv: list[str] | None = None) -> VaeTrainConfig:
    """Command-line flags -> config (every config field is a flag: --batch-size, --eval-data, ...)."""
    p = loop.ArgumentParser(prog="altforge train vae", description="Train an AutoencoderKL on image shards.")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    for f in fields(VaeTrainConfig):
        if f.name in ("data", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=f.default)
        elif f.name == "storage_options":
            p.add_argument(flag, type=json.loads, default=None, help="JSON object of fsspec options")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=f.default)
    ns = vars(p.parse_args(argv))
    ns["betas"] = tuple(ns["betas"])
    return loop.config_from_flags(VaeTrainConfig, ns)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m training.train_vae`` and torchrun."""
    return loop.trainer_main(train, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
