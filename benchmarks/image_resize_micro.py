"""Micro-benchmark of pipeline.images.process_image on one core, against an img2dataset-style OpenCV pipeline.

    python benchmarks/image_resize_micro.py              # throughput on a JPEG/PNG/WebP mix, 64-1024 px
    python benchmarks/image_resize_micro.py --filters    # decode+resize time and PSNR per Pillow filter

Inputs are synthetic photo-like images (multi-scale noise plus anti-aliased shapes), made in memory. The baseline
needs OpenCV (``pip install opencv-python-headless``), which is not a project dependency: without it the script
says so on stderr and measures altforge alone.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from pipeline.images import ImageConfig, process_image

try:
    import cv2
except ImportError:
    cv2 = None


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A photo-like RGB image: 1/f-ish noise at several scales, fine grain, and a few sharp anti-aliased rings."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in [(4, 90), (16, 50), (64, 30), (256, 18), (1024, 10)]:
        gw, gh = max(2, w * cells // 2048), max(2, h * cells // 2048)
        for c in range(3):
            field = Image.fromarray(rng.normal(0, 1, (gh, gw)).astype(np.float32), "F")
            acc[..., c] += amp * np.asarray(field.resize((w, h), Image.Resampling.BICUBIC))
    acc += rng.normal(0, 4, (h, w, 3))
    img = Image.fromarray(np.clip(acc + 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(4, max(5, w // 4)))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=int(rng.integers(1, 12)))
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def opencv_pipeline(data: bytes, size: int) -> bytes:
    """What img2dataset's Resizer does for keep_ratio, resize_only_if_bigger=True, jpg q95."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError("decode error")
    if img.ndim == 3 and img.shape[2] == 4:
        alpha = img[:, :, 3:4]
        img = np.rint((alpha / 255 * img[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)
    h, w = img.shape[:2]
    if min(h, w) > size:
        s = size / min(h, w)
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 95])[1].tobytes()


def per_second(fn, inputs: list[bytes], repeat: int) -> float:
    """Best-of-``repeat`` images/s of ``fn`` over ``inputs``."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for data in inputs:
            fn(data)
        best = min(best, time.perf_counter() - t0)
    return len(inputs) / best


def throughput(size: int, repeat: int) -> None:
    """Images/s of process_image vs the OpenCV pipeline, per format and for the mix."""
    rng = np.random.default_rng(1)
    sides = [64, 128, 256, 512, 768, 1024]
    mix = {"JPEG": [], "PNG": [], "WEBP": []}
    for i in range(36):
        long, short = sides[i % len(sides)], int(sides[i % len(sides)] * rng.uniform(0.5, 1.0))
        w, h = (long, short) if i % 3 else (short, long)
        for fmt in mix:
            mix[fmt].append(encode(photo(w, h, i), fmt))
    cfg = ImageConfig(image_size=size, resize_mode="keep_ratio", encode_format="jpg", encode_quality=95)
    print(f"one core, {size} px keep_ratio, JPEG q95 out; {len(mix['JPEG'])} images per format, 64-1024 px")
    ours_fn = lambda d: process_image(d, cfg)  # noqa: E731
    base_fn = lambda d: opencv_pipeline(d, size)  # noqa: E731
    for name, inputs in [*mix.items(), ("mix 60/25/15", _mix(mix))]:
        ours, base = 0.0, 0.0
        for _ in range(repeat):  # interleaved, best of each: a busy neighbour hurts both alike
            ours = max(ours, per_second(ours_fn, inputs, 1))
            base = max(base, per_second(base_fn, inputs, 1)) if cv2 is not None else 0.0
        line = f"  {name:14s} process_image {ours:7.1f} img/s"
        if cv2 is not None:
            line += f"   opencv {base:7.1f} img/s   ratio {ours / base:4.2f}x"
        print(line)


def _mix(mix: dict[str, list[bytes]]) -> list[bytes]:
    n = len(mix["JPEG"])
    return mix["JPEG"][: n * 60 // 100] + mix["PNG"][: n * 25 // 100] + mix["WEBP"][: n * 15 // 100]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def mean_psnr(outs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    return float(np.mean([psnr(o, r) for o, r in zip(outs, refs, strict=True)]))


def filters(size: int, repeat: int) -> None:
    """Per Pillow filter: decode+resize ms of a 2048x1536 JPEG with/without draft, PSNR vs full-decode references."""
    jpgs = [encode(photo(2048, 1536, s), "JPEG") for s in range(3)]
    tw, th = round(2048 * size / 1536), size
    full = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpgs]
    ref_lanczos = [np.asarray(f.resize((tw, th), Image.Resampling.LANCZOS)) for f in full]
    ref_area = [cv2.resize(np.asarray(f), (tw, th), interpolation=cv2.INTER_AREA) for f in full] if cv2 else None
    for draft_gap in (None, 1.0, 2.0):
        for f in ("BOX", "BILINEAR", "HAMMING", "BICUBIC", "LANCZOS"):
            for gap in (None, 3.0):

                def run(data, f=f, gap=gap, draft_gap=draft_gap):
                    im = Image.open(io.BytesIO(data))
                    if draft_gap:
                        im.draft("RGB", (math.ceil(tw * draft_gap), math.ceil(th * draft_gap)))
                    return np.asarray(im.resize((tw, th), Image.Resampling[f], reducing_gap=gap))

                ms = 1e3 / per_second(run, jpgs, repeat)
                outs = [run(j) for j in jpgs]
                line = f"  draft={draft_gap} {f:8s} gap={gap}  {ms:6.1f} ms"
                line += f"  PSNR vs lanczos {mean_psnr(outs, ref_lanczos):5.1f}"
                if ref_area:
                    line += f"  vs INTER_AREA {mean_psnr(outs, ref_area):5.1f}"
                print(line)
    if cv2 is not None:

        def run_cv(data):
            return cv2.resize(cv2.imdecode(np.frombuffer(data, np.uint8), 1), (tw, th), interpolation=cv2.INTER_AREA)

        print(f"  opencv full decode + INTER_AREA  {1e3 / per_second(run_cv, jpgs, repeat):6.1f} ms")


def main() -> None:
    """Parse the flags and run one benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="target size, px")
    parser.add_argument("--repeat", type=int, default=5, help="best of N passes")
    parser.add_argument("--filters", action="store_true", help="compare Pillow resize filters instead")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    if cv2 is not None:
        cv2.setNumThreads(1)
    else:
        print(
            "note: OpenCV is not installed, so the img2dataset-style OpenCV baseline is skipped and no ratio is "
            "reported; install it with `pip install opencv-python-headless` (it is not a project dependency)",
            file=sys.stderr,
        )
    (filters if args.filters else throughput)(args.size, args.repeat)


if __name__ == "__main__":
    main()
