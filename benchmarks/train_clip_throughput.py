"""Training throughput of the CLIP loop: samples/s and data-wait fraction, tiny config on CPU or ViT-B-32 on a GPU.

    python benchmarks/train_clip_throughput.py                       # tiny config, CPU, demo shards it writes
    python benchmarks/train_clip_throughput.py --model ViT-B-32 --batch-size 256 --image-size 224 --workers 8

It writes demo-site shards (at the model's input size, so no resize cost is hidden) unless ``--data`` is given,
runs ``training.train_clip.train`` for ``--steps`` steps and reports the mean over the logged windows after
the first (warm-up). A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from training.models import model_config  # noqa: E402
from training.synthetic import write_demo_shards  # noqa: E402
from training.train_clip import ClipTrainConfig, train  # noqa: E402


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

    work = tempfile.mkdtemp(prefix="altforge-bench-")
    size = model_config(args.model)["vision_cfg"].get("image_size", 224)
    data = args.data
    if data is None:
        data = os.path.join(work, "data")
        t0 = time.perf_counter()
        # at least two shards per loader worker: with fewer shards than workers every worker reads all of them
        per_shard = max(100, min(2000, args.samples // (2 * max(1, args.workers))))
        write_demo_shards(data, args.samples, seed=0, size=size, per_shard=per_shard, mismatch_rate=0.2)
        print(f"wrote {args.samples} demo samples at {size}px in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
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
    device = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else platform.processor()
    )
    result = {
        "model": args.model,
        "device": device or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "image_size": size,
        "samples_per_s": round(statistics.mean(r["samples_per_s"] for r in rows), 1),
        "data_wait": round(statistics.mean(r["data_wait"] for r in rows), 4),
        "windows": len(rows),
        "load_avg": os.getloadavg()[0],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
