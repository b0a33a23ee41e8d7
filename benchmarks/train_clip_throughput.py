"""Training throughput of the CLIP loop against a plain open_clip + torch loop: samples/s and data-wait fraction.

    python benchmarks/train_clip_throughput.py                       # tiny config, CPU, demo shards it writes
    python benchmarks/train_clip_throughput.py --model ViT-B-32 --batch-size 256 --image-size 224 --workers 8
    python benchmarks/train_clip_throughput.py --samples 400 --batch-size 16 --steps 6 --log-every 2   # smoke

It writes demo-site shards (at the model's input size, so no resize cost is hidden) unless ``--data`` is given,
runs ``training.train_clip.train`` for ``--steps`` steps and reports the mean over the logged windows after
the first (warm-up). In the same run, on the same shards, it runs the loop a user would otherwise write
(``plain_open_clip``): ``open_clip.create_model_and_transforms`` (same architecture, its eval transform: no
augmentation, as the trainer's default), a torch DataLoader decoding the shards with webdataset and PIL in
``--workers`` processes, open_clip's ``ClipLoss``, AdamW with the trainer's defaults (lr, betas, eps, weight decay),
gradient clipping at 1.0, the same precision, batch and threads, timed after its first ``--log-every`` steps.
``vs_plain_open_clip`` is altforge's samples/s over the plain loop's. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipeline.shards import shard_urls  # noqa: E402
from training.loop import resolve_precision  # noqa: E402
from training.models import model_config, resolve_model_name  # noqa: E402
from training.synthetic import write_demo_shards  # noqa: E402
from training.train_clip import ClipTrainConfig, train  # noqa: E402


def _sample_pair(sample: tuple, preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(PIL image, caption) -> (image tensor, token ids); module level so DataLoader workers can pickle it."""
    image, caption = sample
    return preprocess(image), tokenizer([caption])[0]


def plain_loader(data: str, preprocess, tokenizer, batch_size: int, workers: int):
    """What a user writes with webdataset: shards -> shuffle -> PIL decode -> transform -> batches, in workers."""
    import functools

    import webdataset as wds

    pair = functools.partial(_sample_pair, preprocess=preprocess, tokenizer=tokenizer)
    ds = (
        wds.WebDataset(sorted(shard_urls(data)), resampled=True, shardshuffle=False)  # endless: steps decide
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg;png;webp", "txt")
        .map(pair)
        .batched(batch_size, partial=False)
    )
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())


def plain_open_clip_rate(args, data: str, device: torch.device, precision: str) -> dict:
    """Samples/s and data wait of the plain open_clip + torch loop over ``data``, after ``--log-every`` steps."""
    import open_clip

    torch.manual_seed(0)
    name = resolve_model_name(args.model)  # the project's configs are registered with open_clip under this name
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    batches = iter(plain_loader(data, preprocess, open_clip.get_tokenizer(name), args.batch_size, args.workers))
    loss_fn = open_clip.ClipLoss()
    defaults = ClipTrainConfig(data=data, out="")
    opt = torch.optim.AdamW(
        model.parameters(), lr=defaults.lr, betas=defaults.betas, eps=defaults.eps, weight_decay=defaults.weight_decay
    )
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    model.train()
    t0, waited = None, 0.0
    for step in range(args.steps):
        if step == args.log_every:  # the first window is warm-up, as for the trainer
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, waited = time.perf_counter(), 0.0
        t_data = time.perf_counter()
        images, texts = next(batches)
        waited += time.perf_counter() - t_data
        images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            image_f, text_f, scale = model(images, texts)
            loss = loss_fn(image_f.float(), text_f.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's own training script does
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    timed = args.steps - args.log_every
    return {"samples_per_s": timed * args.batch_size / seconds, "data_wait": waited / seconds}


def write_data(args, work: str, size: int) -> str:
    """Demo shards at ``size`` px under ``work`` (or ``--data`` as given)."""
    if args.data is not None:
        return args.data
    data = os.path.join(work, "data")
    t0 = time.perf_counter()
    # at least two shards per loader worker: with fewer shards than workers every worker reads all of them
    per_shard = max(100, min(2000, args.samples // (2 * max(1, args.workers))))
    write_demo_shards(data, args.samples, seed=0, size=size, per_shard=per_shard, mismatch_rate=0.2)
    print(f"wrote {args.samples} demo samples at {size}px in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return data


def compare(args, work: str) -> dict:
    """Both arms on the same shards; the result row."""
    size = model_config(args.model)["vision_cfg"].get("image_size", 224)
    data = write_data(args, work, size)
    cfg = ClipTrainConfig(
        data=data,
        out=os.path.join(work, "run"),
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=max(1, args.steps // 10),
        workers=args.workers,
        log_every=args.log_every,
        save_every=0,
        precision=args.precision,
        device=args.device,
        threads=args.threads,
        progress=False,
    )
    logged = train(cfg)["train"]
    rows = logged[1:] or logged  # the first window holds the warm-up
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if on_gpu else "cpu")
    precision = resolve_precision(args.precision, device)
    plain = plain_open_clip_rate(args, data, device, precision)
    ours = statistics.mean(r["samples_per_s"] for r in rows)
    return {
        "model": args.model,
        "device": (torch.cuda.get_device_name(0) if on_gpu else platform.processor()) or "cpu",
        "precision": precision,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "image_size": size,
        "samples_per_s": round(ours, 1),
        "data_wait": round(statistics.mean(r["data_wait"] for r in rows), 4),
        "windows": len(rows),
        "plain_open_clip_samples_per_s": round(plain["samples_per_s"], 1),
        "plain_open_clip_data_wait": round(plain["data_wait"], 4),
        "vs_plain_open_clip": round(ours / plain["samples_per_s"], 2),
        "load_avg": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line of results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--data", help="existing shards (default: write demo shards)")
    p.add_argument("--samples", type=int, default=20000, help="demo samples to write")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0 < args.log_every < args.steps:
        p.error("--log-every must be at least 1 and below --steps (its first window is the warm-up)")
    if args.data is not None:
        args.data = os.path.abspath(args.data)
    work = tempfile.mkdtemp(prefix="altforge-bench-")
    try:
        result = compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the demo shards and the run directory
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
