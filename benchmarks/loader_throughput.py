"""The diffusion trainer's loader alone, on one core: altforge's shard loader, with and without its sample cache,
against the webdataset pipeline a user would otherwise write.

    python benchmarks/loader_throughput.py                      # synthetic latent shards (8x8x4, (16, 32) text)
    python benchmarks/loader_throughput.py demo-output/latents  # a latent dataset of your own

Every loader runs in this process (``workers`` 0, one torch thread) with batch ``--batch-size`` and reads
``--epochs`` epochs. altforge's loader decodes what train_ldm reads (``training.latent_data.latent_map``: the
arrays, the noise, the timestep and the dropout draw), so it does more per sample than the baseline, which only
decodes the two arrays (``wds.WebDataset(...).shuffle(1000).decode()``, from train_ldm_throughput.py). Reported:
samples/s of the first epoch and of the later ones, and altforge's over webdataset's. A script, not a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from train_ldm_throughput import plain_loader, write_synthetic_latents  # noqa: E402

from training.data import DataPosition, LoaderConfig, make_loader, make_plan  # noqa: E402
from training.latent_data import inspect_latents, latent_map  # noqa: E402


def altforge_rates(data: str, batch_size: int, epochs: int, cache_mb: int) -> dict:
    """samples/s of the first epoch and of the rest, through make_loader as train_ldm builds it."""
    latents = inspect_latents(data)
    cfg = LoaderConfig(batch_size=batch_size, workers=0, seed=0, cache_mb=cache_mb)
    plan = make_plan(data, cfg, world_size=1)
    fn = functools.partial(
        latent_map,
        scale=latents.scaling_factor,
        text=latents.text_in_shards,
        offset=0.0,
        flip_p=0.5,
        shape=latents.latent_shape,
        text_shape=latents.text_shape,
    )
    it = iter(make_loader(plan, cfg, 0, fn, DataPosition()))
    per_epoch = plan.steps_per_epoch
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _ in range(per_epoch):
            next(it)
        times.append(time.perf_counter() - t0)
    n = per_epoch * batch_size
    return {"first_epoch": n / times[0], "later_epochs": n * (epochs - 1) / sum(times[1:]), "per_epoch": n}


def webdataset_rate(data: str, batch_size: int, samples: int) -> float:
    """samples/s of the plain webdataset loader over ``samples`` samples (after one warm-up batch)."""
    it = iter(plain_loader(data, batch_size, 0))
    next(it)
    t0 = time.perf_counter()
    for _ in range(samples // batch_size):
        next(it)
    return (samples // batch_size) * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="?", help="a latent dataset; default: synthetic shards in a temporary folder")
    p.add_argument("--samples", type=int, default=8000, help="synthetic samples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, "latents")
            write_synthetic_latents(data, args.samples, per_shard=1000)
        off = altforge_rates(data, args.batch_size, args.epochs, 0)
        on = altforge_rates(data, args.batch_size, args.epochs, LoaderConfig.cache_mb)
        wds_rate = webdataset_rate(data, args.batch_size, off["per_epoch"] * (args.epochs - 1))
    result = {
        "data": args.data or f"synthetic, {args.samples} samples",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "batch_size": args.batch_size,
        "samples_per_epoch": off["per_epoch"],
        "altforge_no_cache": {k: round(v, 1) for k, v in off.items() if k != "per_epoch"},
        "altforge_cache": {k: round(v, 1) for k, v in on.items() if k != "per_epoch"},
        "webdataset": round(wds_rate, 1),
        "vs_webdataset_later_epochs": round(on["later_epochs"] / wds_rate, 2),
        "vs_webdataset_no_cache": round(off["later_epochs"] / wds_rate, 2),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
