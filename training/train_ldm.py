"""Text-conditioned latent diffusion training on latent shards: one process, or DDP under torchrun. Top to bottom.

python -m training.train_ldm LATENTS --out RUN [--config tiny] [--steps N]
torchrun --nproc-per-node 8 -m training.train_ldm LATENTS --out RUN --config sd15 --batch-size 64 --lr 1e-4

Every random choice of a sample (flip, posterior draw, noise, timestep, CFG dropout) is drawn in the data map from
the sample's own seeded RNG (training/data.py derives it from the seed, the epoch and the key). So a run is the
same on 1 rank or 8, and a resumed run replays exactly what the uninterrupted one would have done.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.storage import redact_secrets
from training import distributed, loop
from training.checkpoint import latest_checkpoint, read_state, resume_loop, save_checkpoint
from training.data import DataPosition, LoaderConfig, make_loader, make_plan, plan_fingerprint
from training.latent_data import inspect_latents, latent_map, text_conditioning
from training.ldm_outputs import N_BUCKETS, export_model, log_row, log_sample_grid, sampling_pipeline
from training.models.text import TextTunedUNet, check_text_encoder, trainable_text_tower
from training.models.unet import build_unet, count_parameters
from training.models.vae import load_vae
from training.objectives import (
    NUM_TRAIN_TIMESTEPS,
    PREDICTION_TYPES,
    add_noise,
    alphas_cumprod,
    check_timestep_sampling,
    diffusion_loss,
    scaled_linear_betas,
    swap_in_empty,
)

DEMO_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star on a navy background",
    "a purple hexagon on a white background",
    "an orange diamond",
    "a small pink circle on a black background",
    "a large white square on a dark green background",
)


@dataclass(frozen=True)
class LdmTrainConfig:
    """Everything a latent diffusion run needs; saved as train_config.json in the run directory."""

    data: str  # latent dataset dir, manifest.json or brace pattern of latent shards (pipeline/latents.py)
    out: str  # run directory: the pipeline folder at its top, checkpoints/, tensorboard/, metrics.json
    config: str = "tiny"  # U-Net config name (training/models/configs/unet-NAME.json) or a JSON path
    text_encoder: str | None = None  # open_clip model / exported dir; None = the one the latent manifest records
    text_pretrained: str | None = None  # its pretrained tag or weights file (with an open_clip architecture name)
    text_in_loop: bool = False  # encode the captions with text_encoder in the loop, ignoring stored embeddings
    train_text_encoder: bool = False  # fine-tune text_encoder's token states with the U-Net (implies text_in_loop)
    text_lr_scale: float = 1.0  # the tuned text tower's learning rate as a multiple of lr
    train_text_embeddings: bool = False  # with train_text_encoder: tune the token embedding table too (slower)
    vae: str | None = None  # VAE folder / pipeline folder / hub id for grids and the pipeline; None = the manifest's
    steps: int = 2000  # optimizer steps
    batch_size: int = 64  # samples per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3  # peak learning rate (the tiny config; ~1e-4 for sd15 at a large global batch)
    min_lr: float = 0.0  # learning rate at the end of the cosine; = lr for a constant schedule
    warmup: int = 100  # linear warm-up, optimizer steps
    clip_grad: float = 1.0  # max global gradient norm; 0 = off
    weight_decay: float = 0.01  # AdamW decay on weight matrices (not biases or norms)
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.999  # per optimizer step; warmed up as min(decay, (1 + step) / (10 + step))
    prediction: str = "epsilon"  # "epsilon" | "v_prediction"
    min_snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (5 is the paper's choice); 0 = off
    offset_noise: float = 0.0  # std of the per-channel noise offset (~0.05-0.1 when used); 0 = off
    timestep_sampling: str = "uniform"  # "uniform" | "logit_normal" (t = T * sigmoid(N(mean, std)), as in SD3)
    timestep_mean: float = 0.0  # logit_normal's mean: > 0 draws noisier timesteps
    timestep_std: float = 1.0  # logit_normal's std
    cond_dropout: float = 0.1  # share of samples whose caption embedding is swapped for the empty prompt's
    flip_p: float = 0.5  # probability of the flipped latent when the shards store one
    precision: str = "auto"  # auto (bf16 on GPU if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the U-Net's forward (GPU runs; the weights and checkpoints are unchanged)
    device: str = "auto"  # auto | cuda | cpu
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # samples per worker
    cache_mb: int = 256  # undecoded samples each loading process keeps in memory for later epochs; 0 = none
    split: str = "shard"  # "shard" or "sample" (see training.data)
    seed: int = 0
    log_every: int = 50  # steps between log lines; 0 = only at the end
    save_every: int = 1000  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    sample_every: int = 0  # steps between image grids (EMA weights; needs a VAE); 0 = no grids
    sample_prompts: tuple[str, ...] = DEMO_PROMPTS  # the fixed prompts of the grids (seed i for prompt i)
    sample_steps: int = 20  # sampler steps for the grids
    sample_guidance: float = 7.5  # guidance scale for the grids
    resume: str = "auto"  # "auto" (latest checkpoint in out), "none", or a checkpoint directory
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    budget_schedule: bool = False  # with max_minutes: end the cosine at the time box if that comes first
    stop_after: int = 0  # leave (and save) at this step although the schedule runs to ``steps``; 0 = off
    threads: int = 0  # torch CPU threads; 0 = torch's default
    progress: bool = True  # progress bar when stderr is a terminal
    storage_options: dict | None = None  # fsspec options for a remote dataset

    def __post_init__(self):
        loop.check_choices(self)
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {self.prediction!r}")
        check_timestep_sampling(self.timestep_sampling)
        if not 0.0 <= self.cond_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("cond_dropout and ema_decay must be in [0, 1)")
        if self.text_lr_scale <= 0:
            raise ValueError(f"text_lr_scale must be > 0, got {self.text_lr_scale}")
        if self.grad_accum < 1 or self.steps < 1:
            raise ValueError("steps and grad_accum must be >= 1")
        at_least = {"keep_checkpoints": 1, "batch_size": 1}
        at_least.update(dict.fromkeys(("log_every", "save_every", "sample_every", "stop_after", "workers"), 0))
        at_least.update(dict.fromkeys(("warmup", "threads", "shuffle_buffer", "cache_mb"), 0))
        bad = [f"{k} = {getattr(self, k)} (needs >= {v})" for k, v in at_least.items() if getattr(self, k) < v]
        bad += loop.float_settings_out_of_range(
            self,
            positive=("lr", "text_lr_scale", "timestep_std"),
            non_negative=("min_lr", "clip_grad", "weight_decay", "min_snr_gamma", "offset_noise", "max_minutes"),
            unit=("flip_p",),
            finite=("timestep_mean",),
        )
        if bad:
            raise ValueError(f"settings out of range: {', '.join(bad)}")
        guidance_ok = math.isfinite(self.sample_guidance) and self.sample_guidance > 0
        if not 1 <= self.sample_steps <= 1000 or not guidance_ok:
            raise ValueError(
                f"sample_steps must be 1..1000 and sample_guidance a number > 0, got {self.sample_steps}, "
                f"{self.sample_guidance}"
            )

    def to_json(self) -> str:
        """The config as JSON, without the credentials of its storage options."""
        return json.dumps(redact_secrets(asdict(self)), indent=2)

    @classmethod
    def from_json(cls, text: str) -> LdmTrainConfig:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        d["betas"], d["sample_prompts"] = tuple(d["betas"]), tuple(d["sample_prompts"])
        return cls(**d)


def lr_at(step: int, cfg: LdmTrainConfig, train_seconds: float = 0.0) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``steps`` (or at the time box: see
    :func:`training.loop.schedule_at`)."""
    return loop.scheduled_lr(cfg, step, train_seconds, cfg.warmup)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on >=2-D weights (convs, linears); biases and norm scales are exempt."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for the trainable parameters (a frozen one equals its copy);
    buffers copied."""
    pairs = [(e, p.detach()) for e, p in zip(ema.parameters(), model.parameters(), strict=True) if p.requires_grad]
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


# ------------------------------------------------------------------------------------------------------- loop


def train(cfg: LdmTrainConfig) -> dict:
    """Run (or resume) training; returns the metrics written to ``out/metrics.json``."""
    dist = distributed.init_distributed(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = loop.run_dir(cfg.out)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # ---- data description, text encoder, empty-prompt embedding
    latents = inspect_latents(cfg.data, cfg.storage_options)
    if latents.has_logvar and latents.scaling_factor is None:
        raise ValueError(f"{cfg.data}: latents with logvar but no scaling_factor in the manifest")
    side = text_conditioning(cfg, latents, dist.device, dist.is_main)
    encoder, empty, width, stored_text = side.encoder, side.empty, side.width, side.stored
    te_model, te_pretrained = side.model, side.pretrained

    # ---- model, EMA, optimizer, precision
    torch.manual_seed(cfg.seed)  # the same init on every rank, and whether or not a text encoder was loaded above
    unet = build_unet(cfg.config, cross_attention_dim=width, sample_size=latents.latent_shape[-1]).to(dist.device)
    channels = latents.latent_shape[0]
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        raise ValueError(
            f"--config {cfg.config} takes {unet.config.in_channels} latent channels and predicts "
            f"{unet.config.out_channels}, the latents have {channels}: use a U-Net config for this VAE"
        )
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    both = torch.nn.ModuleDict({"unet": unet, "ema": ema})  # one checkpoint file holds both, written atomically
    groups = param_groups(unet, cfg.weight_decay)
    text = ema_text = tuned = None
    if cfg.train_text_encoder:  # the tower learns with the U-Net; its EMA goes into the pipeline folder
        text = trainable_text_tower(encoder.model, cfg.train_text_embeddings)
        ema_text = copy.deepcopy(text).requires_grad_(False).eval()
        tuned = dataclasses.replace(encoder, model=ema_text)  # the tower the grids and the pipeline folder use
        both.update({"text": text, "ema_text": ema_text})
        # no decay: the tower starts from trained weights, and decay would pull its embeddings toward zero
        tower = [p for p in text.parameters() if p.requires_grad]
        groups.append({"params": tower, "weight_decay": 0.0, "lr_scale": cfg.text_lr_scale})
    trainable = [p for g in groups for p in g["params"]]
    precision = loop.resolve_precision(cfg.precision, dist.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # fused: one kernel for all parameters, on CPU (~10% a step, BENCHMARKS.md) as on CUDA
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    abar = alphas_cumprod(scaled_linear_betas()).float().to(dist.device)

    # ---- data
    loader_cfg = LoaderConfig.of(cfg)
    plan = make_plan(cfg.data, loader_cfg, dist.world_size, cfg.storage_options)
    data_plan = plan_fingerprint(plan, loader_cfg)  # saved with every checkpoint
    position = DataPosition()

    # ---- resume
    step, history, train_seconds = 0, {"train": [], "samples": []}, 0.0
    # what a resume must share with the run it continues, besides the tensors' shapes (checked on load): the
    # architecture, the target, and the text conditioning the U-Net learnt from
    if not stored_text:  # the tower's weights (sha256), however its folder was named
        prov = encoder.provenance
        text_id = {"encoder": prov.get("sha256") or f"{prov.get('model')}:{prov.get('pretrained')}"}
        text_id["tuned"] = cfg.train_text_encoder
        if cfg.train_text_encoder:
            text_id["embeddings_tuned"] = cfg.train_text_embeddings
    else:  # the shards' embeddings; the encoder that made them is checked through the empty prompt above
        text_id = {"stored_embeddings": list(latents.text_shape or ())}
    identity = json.loads(json.dumps({
        "model_config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
        "prediction": cfg.prediction,
        "text_encoder": text_id,
    }, default=str))  # fmt: skip
    ckpt = latest_checkpoint(out) if cfg.resume == "auto" else (None if cfg.resume == "none" else Path(cfg.resume))
    if ckpt is not None:
        saved = read_state(ckpt).get("identity")
        if saved is not None and saved != identity:
            what = [k for k in identity if saved.get(k) != identity[k]]
            raise ValueError(
                f"{ckpt} was trained with another {' and '.join(w.replace('_', ' ') for w in what)}: start over "
                "with --resume none, or use another --out"
            )
        doc, step, history, train_seconds = resume_loop(ckpt, both, optimizer, scaler)
        position, same_layout = DataPosition.resumed(doc, dist.rank, dist.world_size, cfg.workers, data_plan)
        if dist.is_main:
            print(f"resumed from {ckpt} at step {step}" + ("" if same_layout else f" (epoch {position.epoch})"))
    watch = loop.DivergenceWatch(dist.device, enabled=not scaler.is_enabled(), start_step=step)
    ddp = None
    net = unet if text is None else TextTunedUNet(unet, text)  # one module: DDP averages both towers' gradients
    if dist.distributed:
        ddp = DistributedDataParallel(net, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    model = torch.compile(ddp or net) if cfg.compile else (ddp or net)
    map_fn = functools.partial(
        latent_map,
        scale=latents.scaling_factor,
        text=stored_text,
        offset=cfg.offset_noise,
        flip_p=cfg.flip_p,
        shape=latents.latent_shape,  # a sample of another shape is a counted skip, not a failed batch
        text_shape=latents.text_shape if stored_text else None,
        timesteps=(cfg.timestep_sampling, cfg.timestep_mean, cfg.timestep_std),
    )
    batches = iter(make_loader(plan, loader_cfg, dist.rank, map_fn, position))

    # ---- logging (rank 0)
    vae_ref = cfg.vae or (latents.info.get("vae") or {}).get("ref")
    writer = vae = pipe = None
    with distributed.main_checks(dist.device):
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=step if step else None)
            (out / "train_config.json").write_text(cfg.to_json(), encoding="utf-8")
            shape = latents.latent_shape
            print(f"U-Net {cfg.config}: {count_parameters(unet) / 1e6:.2f}M parameters, latents {shape}")
        if dist.is_main and vae_ref and te_model:  # the grids and the pipeline folder need both: loaded (checked)
            vae = load_vae(vae_ref)  # now, not after the last step
            if encoder is None:
                check_text_encoder(te_model, te_pretrained)
        if dist.is_main and cfg.sample_every > 0:
            if vae is not None and encoder is not None:
                pipe = sampling_pipeline(ema, vae, tuned or encoder, empty, cfg.prediction)
            else:
                print("no VAE or text encoder known (--vae / --text-encoder, or the latent manifest): no image grids")

    last_batch: list = []  # the last micro-batch, for the divergence probe

    def probe() -> torch.Tensor | None:  # the loss of the current weights on the last batch
        if not last_batch:
            return None
        noisy, t, cond, x0, noise = last_batch

        def loss() -> torch.Tensor:
            return diffusion_loss(net(noisy, t, **cond).sample, x0, noise, t, abar, cfg.prediction)[0]

        return loop.probe_loss(net, dist.device, amp_dtype, loss)

    def grid() -> None:
        watch.check(step, cfg.lr, probe)
        if pipe is not None:
            if ema_text is not None:  # the tuned tower's own empty prompt
                pipe.empty_emb = pipe.text_encoder.empty().float()
            history["samples"].append(log_sample_grid(writer, step, pipe, cfg, out))
        distributed.barrier()

    def save() -> None:
        watch.check(step, cfg.lr, probe)
        data = distributed.all_gather_object(position.to_dict())
        if dist.is_main:
            state = {
                "config": asdict(cfg),
                "scheduler": {"step": step, "lr": lr_at(max(0, step - 1), cfg, train_seconds)},
                "scaler": scaler.state_dict(),
                "data": data,
                "world_size": dist.world_size,
                "workers": cfg.workers,
                "steps_per_epoch": plan.steps_per_epoch,
                "data_plan": data_plan,
                "metrics": history,
                "train_seconds": train_seconds,
                "identity": identity,  # a resume with another architecture, target or text tower is refused
            }
            save_checkpoint(out, step, both, optimizer, state, cfg.keep_checkpoints)
        distributed.barrier()

    def new_window() -> dict:
        zeros = functools.partial(torch.zeros, device=dist.device, dtype=torch.float64)
        return dict(t=time.perf_counter(), data=0.0, steps=0, loss=zeros(()), sum=zeros(N_BUCKETS), n=zeros(N_BUCKETS))

    global_batch = cfg.batch_size * cfg.grad_accum * dist.world_size
    bar = tqdm(total=cfg.steps, initial=step, disable=not (dist.is_main and cfg.progress) or None, unit="step")
    window = new_window()
    model.train()
    stop = loop.stop_before_start(cfg, step, train_seconds, dist.is_main)  # a relaunch of a run that got there
    while step < cfg.steps and not stop:
        t_step = time.perf_counter()
        lr = lr_at(step, cfg, train_seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            t_data = time.perf_counter()
            batch = position.advance(next(batches))
            window["data"] += time.perf_counter() - t_data
            x0 = batch["latent"].to(dist.device, non_blocking=True)
            noise = batch["noise"].to(dist.device, non_blocking=True)
            t = batch["timestep"].to(dist.device, non_blocking=True)
            drop = batch["drop_u"] < cfg.cond_dropout
            if text is not None:  # the tower in autograd; dropped captions become the empty prompt it is learning
                captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)]
                cond = {"tokens": encoder.tokenizer(captions).to(dist.device)}
            else:
                if stored_text:
                    emb = batch["text_emb"].to(dist.device, non_blocking=True)
                else:  # the frozen encoder, outside autograd (clone: inference tensors cannot be saved for backward)
                    emb = encoder.encode(batch["caption"]).clone()
                cond = {"encoder_hidden_states": swap_in_empty(emb, empty, drop.to(dist.device))}
            noisy = add_noise(x0, noise, t, abar).contiguous(memory_format=torch.channels_last)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or ddp is None else ddp.no_sync()
            autocast = torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
            with sync:
                with autocast:
                    pred = model(noisy, t, **cond).sample
                loss, per_sample = diffusion_loss(pred, x0, noise, t, abar, cfg.prediction, cfg.min_snr_gamma)
                scaler.scale(loss / cfg.grad_accum).backward()
            watch.see(loss)
            last_batch[:] = [noisy, t, cond, x0, noise]
            window["loss"] += loss.detach() / cfg.grad_accum
            bucket = t * N_BUCKETS // NUM_TRAIN_TIMESTEPS
            window["sum"].index_add_(0, bucket, per_sample.double())
            window["n"].index_add_(0, bucket, torch.ones_like(per_sample, dtype=torch.float64))
        scaler.unscale_(optimizer)
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if text is not None:
            ema_update(ema_text, text, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        window["steps"] += 1
        train_seconds += time.perf_counter() - t_step
        bar.update(1)
        if dist.distributed and cfg.max_minutes > 0:  # rank 0's clock, for the stop and the schedule alike
            train_seconds = distributed.main_value(train_seconds, dist.device)
        stop = loop.reached_stop(cfg, step, train_seconds)

        if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps or stop:
            watch.check(step, cfg.lr)
            row = log_row(window, step, lr, global_batch, train_seconds, dist)
            history["train"].append(row)
            if dist.is_main:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("data/errors", sum(position.errors.values()), step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.0f}")
                loop.write_json(out / "metrics.json", {"config": asdict(cfg), "step": step, **history})
                if bar.disable:  # no terminal: one log line per window instead of the bar
                    print(" ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
            window = new_window()
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps and not stop:
            grid()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps and not stop:
            save()
        if stop:
            break
    bar.close()

    # ---- the end: checkpoint, last grid, the pipeline folder (EMA weights); saved first, so nothing after it can
    # cost the run its end state
    save()
    grid()
    errors = distributed.all_gather_object(dict(position.errors))
    result = {"config": asdict(cfg), "step": step, "train_seconds": round(train_seconds, 2), **history}
    result["data_errors"] = dict(sum((Counter(e) for e in errors), start=Counter()))
    result["unet_parameters"] = count_parameters(unet)
    if dist.is_main:
        lineage = dict(
            data=cfg.data,
            latents=latents.info,
            train_config=asdict(cfg),
            step=step,
            train_seconds=result["train_seconds"],
        )
        text_state = None
        if ema_text is not None:  # the tuned tower and the empty prompt it ended with
            text_state = {k: v.detach().cpu() for k, v in ema_text.state_dict().items()}
            empty = tuned.empty().float()
        result["exported"] = export_model(
            out, ema, vae, te_model, te_pretrained, empty, cfg, lineage, text_state=text_state
        )
        loop.write_json(out / "metrics.json", result)
        writer.close()
        if result["data_errors"]:
            print(f"skipped samples: {result['data_errors']}")
    distributed.barrier()
    distributed.cleanup()
    return result


FLAG_ALIASES = {"warmup": "--warmup-steps", "clip_grad": "--grad-clip"}  # as train_clip and train_vae call them


def parse_args(argv: list[str] | None = None) -> LdmTrainConfig:
    """Command-line flags -> config (every config field is a flag: --batch-size, --min-snr-gamma, ...)."""
    p = loop.ArgumentParser(prog="altforge train ldm", description="Train a latent diffusion U-Net on latents.")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    for f in fields(LdmTrainConfig):
        if f.name in ("data", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name in FLAG_ALIASES:  # the CLIP and VAE trainers' names for the same settings work too
            kind = {"int": int, "float": float}[f.type]
            p.add_argument(flag, FLAG_ALIASES[f.name], dest=f.name, type=kind, default=f.default)
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=f.default)
        elif f.name == "sample_prompts":
            p.add_argument(flag, nargs="+", default=f.default)
        elif f.name == "storage_options":
            p.add_argument(flag, type=json.loads, default=None, help="fsspec options as JSON")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=f.default)
    ns = vars(p.parse_args(argv))
    ns["betas"], ns["sample_prompts"] = tuple(ns["betas"]), tuple(ns["sample_prompts"])
    return loop.config_from_flags(LdmTrainConfig, ns)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m training.train_ldm`` and torchrun."""
    return loop.trainer_main(train, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
