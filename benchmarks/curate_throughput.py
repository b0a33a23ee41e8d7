"""Pairs/s through curation's scoring + filtering, against a plain open_clip loop with the same model and batch.

    python benchmarks/curate_throughput.py [--data DIR] [--model ViT-B-32|RUN_DIR] [--pretrained TAG|FILE]
        [--n 1024] [--batch-size 64] [--workers 2] [--device cpu|cuda] [--image-size 256]

Without ``--data`` it writes ``--n`` synthetic JPEG pairs (``--image-size`` px) into a temporary dataset. The
model's weights do not matter for throughput: an architecture name without ``--pretrained`` runs random weights.
The altforge side is the whole stage minus the report: pass 1 (decode in DataLoader workers, batched inference,
float16 embeddings and score tables written), global threshold and dedup, and the resharding of kept samples.
The baseline decodes in the main thread and keeps scores in memory (what a short script would do).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.curate.scorer import load_scorer  # noqa: E402
from pipeline.curate.stage import curate_dataset  # noqa: E402
from pipeline.recipe import CurateSection  # noqa: E402
from pipeline.shards import ShardWriter, first_image, iter_samples, shard_urls  # noqa: E402
from pipeline.stats import StageStats  # noqa: E402


def synthetic_dataset(root: str, n: int, size: int, per_shard: int = 256) -> str:
    """``n`` random-texture JPEG pairs in shards of ``per_shard``."""
    rng = np.random.default_rng(0)
    for index in range((n + per_shard - 1) // per_shard):
        with ShardWriter(root, index) as w:
            count = min(per_shard, n - index * per_shard)
            for i in range(count):
                small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                key = f"{index:06d}{i:06d}"
                meta = {"sha256": f"{index}-{i}", "width": size, "height": size}
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"a picture number {i}", "json": meta})
            w.publish(StageStats(seen=count, kept=count))
    return root


def plain_open_clip(urls: list[str], scorer, batch_size: int, keep_fraction: float) -> tuple[int, float]:
    """The baseline: decode + preprocess inline, encode in batches, cosine, a percentile cut; returns (n, secs)."""
    model, preprocess, tokenizer, device = scorer.model, scorer.transform, scorer.tokenizer, scorer.device
    t0 = time.perf_counter()
    scores, images, texts = [], [], []

    def flush():
        with torch.no_grad(), scorer.autocast():
            i = model.encode_image(torch.stack(images).to(device))
            t = model.encode_text(tokenizer(texts).to(device))
        i = i.float() / i.float().norm(dim=-1, keepdim=True)
        t = t.float() / t.float().norm(dim=-1, keepdim=True)
        scores.extend((i * t).sum(-1).cpu().tolist())
        images.clear()
        texts.clear()

    for url in urls:
        for s in iter_samples(url, decode=False):
            images.append(preprocess(Image.open(io.BytesIO(first_image(s))).convert("RGB")))
            texts.append(s["txt"].decode())
            if len(images) == batch_size:
                flush()
    if images:
        flush()
    cut = np.quantile(np.array(scores), 1 - keep_fraction)
    _ = int((np.array(scores) >= cut).sum())
    return len(scores), time.perf_counter() - t0


def main() -> None:
    """Run both, print pairs/s and the ratio (one JSON line at the end)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="curate-bench-")
    try:
        result = compare(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the synthetic data and the curated copy
    print(
        f"altforge curate: {result['altforge_pairs_per_s']} pairs/s; plain open_clip loop: "
        f"{result['plain_open_clip_pairs_per_s']} pairs/s; ratio {result['ratio']}x"
    )
    print(json.dumps(result))


def compare(args: argparse.Namespace, tmp: str) -> dict:
    """Both arms over ``--data`` (or synthetic pairs written under ``tmp``); the result row."""
    data = args.data or synthetic_dataset(os.path.join(tmp, "src"), args.n, args.image_size)
    scorer = load_scorer(args.model, args.pretrained, args.device)
    urls = shard_urls(data)
    cfg = CurateSection(
        clip={"model": args.model, "pretrained": args.pretrained},
        keep_fraction=0.8,
        batch_size=args.batch_size,
        workers=args.workers,
        report=False,
        device=args.device,
        dedup={"phash_distance": None, "embedding_threshold": 0.99},
    )
    plain_open_clip(urls[:1], scorer, args.batch_size, 0.8)  # warm-up (allocator, kernels)
    n_plain, t_plain = plain_open_clip(urls, scorer, args.batch_size, 0.8)
    t0 = time.perf_counter()
    m = curate_dataset(data, os.path.join(tmp, "out"), cfg, scorer)
    t_ours = time.perf_counter() - t0
    n_ours = m["stats"]["seen"]
    result = {
        "model": args.model,
        "device": str(scorer.device),
        "threads": torch.get_num_threads(),
        "dataloader_workers": args.workers,
        "batch_size": args.batch_size,
        "pairs": n_ours,
        "altforge_pairs_per_s": round(n_ours / t_ours, 1),
        "plain_open_clip_pairs_per_s": round(n_plain / t_plain, 1),
        "ratio": round((n_ours / t_ours) / (n_plain / t_plain), 2),
        "score_seconds": round(m.get("score_timings", {}).get("score", 0.0), 2),
        "total_seconds": round(t_ours, 2),
    }
    return result


if __name__ == "__main__":
    main()
