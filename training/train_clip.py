"""Contrastive (CLIP) training on shards: one process, or DDP under torchrun. Reads top to bottom.

python -m training.train_clip DATA --out RUN [--config tiny] [--steps N]
torchrun --nproc-per-node 8 -m training.train_clip DATA --out RUN --config ViT-B-32 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
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
from training.evaluate import demo_tasks, evaluate_clip, load_eval_set
from training.models import create_clip, export_open_clip, get_tokenizer, make_clip_map, model_config
from training.objectives import clamp_logit_scale, clip_loss


@dataclass(frozen=True)
class ClipTrainConfig:
    """Everything a CLIP run needs; saved as train_config.json in the run directory."""

    data: str  # dataset dir, manifest.json or brace pattern of shards
    out: str  # run directory (checkpoints, tensorboard, metrics.json, open_clip export)
    model: str = "tiny"  # project config name (training/models/configs), JSON path, or open_clip architecture
    steps: int = 1000  # optimizer steps
    batch_size: int = 128  # samples per rank per micro-step
    accum_steps: int = 1  # micro-steps per optimizer step (negatives stay within a micro-batch)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the cosine
    warmup_steps: int = 100  # linear warm-up, optimizer steps
    weight_decay: float = 0.1  # AdamW decay on weight matrices (not biases, norms, embeddings, logit scale)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    precision: str = "auto"  # auto (bf16 on GPU if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N (one process)
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # samples per worker
    cache_mb: int = 256  # undecoded samples each loading process keeps in memory for later epochs; 0 = none
    split: str = "shard"  # "shard" or "sample" (see training.data)
    min_crop_scale: float = 1.0  # random-crop augmentation: smallest area fraction kept; 1 = off
    grayscale_p: float = 0.0  # share of training images turned grey (forces shape features, not colour alone)
    init_logit_scale: float = 0.0  # initial exp(logit scale); 0 = the architecture's default (1/0.07)
    seed: int = 0
    log_every: int = 10  # steps between log lines; 0 = only at the end
    save_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    eval_data: str | None = None  # held-out shards for zero-shot (demo attributes) and retrieval
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    eval_limit: int = 2000  # held-out samples used
    resume: str = "auto"  # "auto" (latest checkpoint in out), "none", or a checkpoint directory
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    budget_schedule: bool = False  # with max_minutes: end the cosine at the time box if that comes first
    stop_after: int = 0  # leave (and save) at this step although the schedule runs to ``steps`` (time slices); 0 = off
    threads: int = 0  # torch CPU threads; 0 = torch's default
    storage_options: str = ""  # JSON fsspec options for s3:// data (endpoint_url, ...); credentials: environment
    progress: bool = True  # progress bar when stderr is a terminal

    def __post_init__(self):
        distributed.check_device(self.device)
        loop.check_choices(self)
        if self.steps < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ValueError("steps, batch_size and accum_steps must be >= 1")
        for name in (
            "log_every",
            "save_every",
            "eval_every",
            "stop_after",
            "warmup_steps",
            "workers",
            "threads",
            "cache_mb",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_limit < 1:
            raise ValueError("eval_limit must be >= 1")
        bad = loop.float_settings_out_of_range(
            self,
            positive=("lr", "eps"),
            non_negative=("min_lr", "weight_decay", "grad_clip", "init_logit_scale", "max_minutes"),
            unit=("grayscale_p",),
        )
        if not (math.isfinite(self.min_crop_scale) and 0 < self.min_crop_scale <= 1):
            bad.append(f"min_crop_scale = {self.min_crop_scale} (needs a number in (0, 1])")
        if bad:
            raise ValueError(f"settings out of range: {', '.join(bad)}")
        try:
            options = json.loads(self.storage_options or "null")
        except ValueError as e:
            raise ValueError(f"storage_options is not JSON: {e}") from None
        if options is not None and not isinstance(options, dict):
            raise ValueError("storage_options must be a JSON object")

    def to_json(self) -> str:
        """The config as JSON, without the credentials of its storage options."""
        return json.dumps(redact_secrets(asdict(self)), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClipTrainConfig:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def lr_at(step: int, cfg: ClipTrainConfig, train_seconds: float = 0.0) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``steps`` (or at the time box: see
    :func:`training.loop.schedule_at`)."""
    return loop.scheduled_lr(cfg, step, train_seconds, cfg.warmup_steps)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay only on >=2-D weights; biases, norms, embeddings and the logit scale are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: ClipTrainConfig) -> dict:
    """Run (or resume) training; returns the metrics written to ``out/metrics.json``."""
    dist = distributed.init_distributed(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = loop.run_dir(cfg.out)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)

    # ---- model, optimizer, precision
    model = create_clip(cfg.model, dist.device, cfg.grad_checkpointing)
    arch = json.loads(json.dumps(model_config(cfg.model)))  # as a checkpoint's state.json holds it
    if cfg.init_logit_scale > 0:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    tokenizer = get_tokenizer(cfg.model)
    precision = loop.resolve_precision(cfg.precision, dist.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    # ---- data
    loader_cfg = LoaderConfig.of(cfg)
    storage_options = json.loads(cfg.storage_options or "null")  # the training and the held-out shards' endpoint
    plan = make_plan(cfg.data, loader_cfg, dist.world_size, storage_options)
    data_plan = plan_fingerprint(plan, loader_cfg)  # saved with every checkpoint
    position = DataPosition()

    # ---- resume
    step, history = 0, {"train": [], "eval": []}
    train_seconds = 0.0
    ckpt = latest_checkpoint(out) if cfg.resume == "auto" else (None if cfg.resume == "none" else Path(cfg.resume))
    if ckpt is not None:
        saved = read_state(ckpt)  # another architecture fails here in one line, not in load_state_dict
        if saved.get("model_config", arch) != arch:
            raise ValueError(
                f"{ckpt} holds a model of another architecture (--config {saved['config']['model']}) than"
                f" --config {cfg.model}: start over with --resume none, or use another --out"
            )
        doc, step, history, train_seconds = resume_loop(ckpt, model, optimizer, scaler)
        position, same_layout = DataPosition.resumed(doc, dist.rank, dist.world_size, cfg.workers, data_plan)
        if dist.is_main:
            print(
                f"resumed from {ckpt} at step {step}" + ("" if same_layout else f" (data from epoch {position.epoch})")
            )
    watch = loop.DivergenceWatch(dist.device, enabled=not scaler.is_enabled(), start_step=step)
    if dist.distributed:
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    raw_model = getattr(model, "module", model)
    last_batch: list = []  # the last micro-batch, for the divergence probe

    def probe() -> torch.Tensor | None:  # the loss of the current weights on the last batch
        if not last_batch:
            return None
        return loop.probe_loss(raw_model, dist.device, amp_dtype, lambda: clip_loss(*raw_model(*last_batch)))

    loader = make_loader(
        plan, loader_cfg, dist.rank, make_clip_map(cfg.model, cfg.min_crop_scale, cfg.grayscale_p), position
    )
    batches = iter(loader)

    # ---- logging and evaluation (rank 0)
    writer = None
    eval_set = None
    with distributed.main_checks(dist.device):
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=step if step else None)
            (out / "train_config.json").write_text(cfg.to_json(), encoding="utf-8")
            if cfg.eval_data:
                eval_set = load_eval_set(cfg.eval_data, make_eval_image(cfg.model), cfg.eval_limit, storage_options)
                if eval_set.errors:
                    print(f"held-out samples skipped: {dict(eval_set.errors)}")

    def run_eval() -> None:
        watch.check(step, cfg.lr, probe)
        done = history["eval"] and history["eval"][-1]["step"] == step  # a finished run relaunched: evaluated
        if eval_set is not None and not done:
            metrics = evaluate_clip(raw_model, tokenizer, eval_set, demo_tasks(), dist.device)
            history["eval"].append({"step": step, "train_seconds": round(train_seconds, 2), **metrics})
            for k, v in metrics.items():
                writer.add_scalar(f"eval/{k}", v, step)
            print(
                f"eval step {step}: "
                + " ".join(
                    f"{k}={v:.3f}"
                    for k, v in metrics.items()
                    if "R@" in k or k.startswith("zeroshot_") and k.count("_") == 1
                )
            )
        distributed.barrier()

    def save() -> None:
        watch.check(step, cfg.lr, probe)
        data = distributed.all_gather_object(position.to_dict())
        if dist.is_main:
            state = {
                "config": asdict(cfg),
                "model_config": arch,  # a resume with another architecture is refused before loading weights
                "scheduler": {"step": step, "lr": lr_at(max(0, step - 1), cfg, train_seconds)},
                "scaler": scaler.state_dict(),
                "data": data,
                "world_size": dist.world_size,
                "workers": cfg.workers,
                "steps_per_epoch": plan.steps_per_epoch,
                "data_plan": data_plan,
                "metrics": history,
                "train_seconds": train_seconds,
            }
            save_checkpoint(out, step, raw_model, optimizer, state, cfg.keep_checkpoints)
        distributed.barrier()

    global_batch = cfg.batch_size * cfg.accum_steps * dist.world_size
    bar = tqdm(total=cfg.steps, initial=step, disable=not (dist.is_main and cfg.progress) or None, unit="step")
    window = {"t": time.perf_counter(), "data": 0.0, "steps": 0, "loss": torch.zeros((), device=dist.device)}
    model.train()
    stop = loop.stop_before_start(cfg, step, train_seconds, dist.is_main)  # a relaunch of a run that got there
    while step < cfg.steps and not stop:
        t_step = time.perf_counter()
        lr = lr_at(step, cfg, train_seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.accum_steps):
            t_data = time.perf_counter()
            batch = position.advance(next(batches))
            window["data"] += time.perf_counter() - t_data
            images = batch["image"].to(dist.device, non_blocking=True)
            texts = batch["text"].to(dist.device, non_blocking=True)
            last = micro == cfg.accum_steps - 1
            sync = contextlib.nullcontext() if last or not dist.distributed else model.no_sync()
            autocast = torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
            with sync, autocast:
                image_features, text_features, logit_scale = model(images, texts)
                loss = clip_loss(image_features.float(), text_features.float(), logit_scale.float())
                scaler.scale(loss / cfg.accum_steps).backward()
            window["loss"] += loss.detach() / cfg.accum_steps
            watch.see(loss)
            last_batch[:] = [images, texts]
        scaler.unscale_(optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        clamp_logit_scale(raw_model.logit_scale)
        step += 1
        window["steps"] += 1
        train_seconds += time.perf_counter() - t_step
        bar.update(1)
        if dist.distributed and cfg.max_minutes > 0:  # rank 0's clock, for the stop and the schedule alike
            train_seconds = distributed.main_value(train_seconds, dist.device)
        stop = loop.reached_stop(cfg, step, train_seconds)

        if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps or stop:
            watch.check(step, cfg.lr)
            scale = float(raw_model.logit_scale.detach().exp())
            row = loop.window_row(window, step, lr, global_batch, train_seconds, dist.device, logit_scale=scale)
            history["train"].append(row)
            if dist.is_main:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("data/errors", sum(position.errors.values()), step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                loop.write_json(out / "metrics.json", {"config": asdict(cfg), "step": step, **history})
                if bar.disable:  # no terminal: one log line per window instead of the bar
                    print(" ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
            window = {"t": time.perf_counter(), "data": 0.0, "steps": 0, "loss": torch.zeros((), device=dist.device)}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and not stop:
            run_eval()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps and not stop:
            save()
        if stop:
            break
    bar.close()

    # ---- the end: save and export first (an evaluation that fails loses nothing), then evaluate
    save()
    if dist.is_main:
        export_open_clip(raw_model, arch, out)
    distributed.barrier()
    if cfg.eval_data:  # the same on every rank: save() gathers from all of them
        run_eval()
        save()  # again, so the checkpoint's history holds the final evaluation too
    errors = distributed.all_gather_object(dict(position.errors))
    result = {"config": asdict(cfg), "step": step, "train_seconds": round(train_seconds, 2), **history}
    result["data_errors"] = dict(sum((Counter(e) for e in errors), start=Counter()))
    if dist.is_main:
        loop.write_json(out / "metrics.json", result)
        writer.close()
        if result["data_errors"]:
            print(f"skipped samples: {result['data_errors']}")
    distributed.barrier()
    distributed.cleanup()
    return result


def make_eval_image(model_name: str):
    """Raw sample -> normalised image tensor with the model's eval preprocessing (no augmentation)."""
    from training.models.clip import image_of, preprocess_config, to_tensor

    pre = preprocess_config(model_config(model_name))
    return functools.partial(
        _eval_image, size=pre["size"], mean=pre["mean"], std=pre["std"], decode=image_of, to_tensor=to_tensor
    )


def _eval_image(sample: dict, size, mean, std, decode, to_tensor) -> torch.Tensor:
    return to_tensor(decode(sample), size, mean, std)


def parse_args(argv: list[str] | None = None) -> ClipTrainConfig:
    """Command-line flags -> config (every config field is a flag: --batch-size, --eval-data, ...)."""
    p = loop.ArgumentParser(prog="altforge train clip", description="Train a CLIP model on WebDataset shards.")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--config", dest="model", default="tiny", help="model: project config, JSON path or open_clip name")
    for f in fields(ClipTrainConfig):
        if f.name in ("data", "out", "model"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=f.default)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=f.default)
    ns = vars(p.parse_args(argv))
    ns["betas"] = tuple(ns["betas"])
    return loop.config_from_flags(ClipTrainConfig, ns)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m training.train_clip`` and torchrun."""
    return loop.trainer_main(train, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
