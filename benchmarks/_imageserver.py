"""Benchmark helpers: a seeded corpus of web-like images cached on disk, and a fast loopback server for it.

The corpus is photo-like JPEG/WebP (gradients, smooth and fine noise, shapes, sensor grain) and illustration-like
PNG (gradients and shapes, some with alpha or a palette), 64-1024 px with varied aspect ratios, plus truncated files
and names that answer 404. The server runs in its own process, holds every file in memory and speaks HTTP/1.1 with
keep-alive through aiohttp's low-level server (no router, no access log).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CORPUS_VERSION = 2  # bump when the generator changes, so cached corpora are rebuilt
FORMAT_MIX = (("jpg", 0.60), ("png", 0.25), ("webp", 0.15))
TRUNCATED_FRACTION = 0.02  # served, but cut at 40-80% of their bytes
MISSING_FRACTION = 0.03  # listed URLs that answer 404
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
WORDS = (  # noqa: SIM905
    "red blue green old small large wooden stone city river mountain street cat dog house bridge tree "
    "garden boat car night morning sunset winter summer market portrait landscape close-up view of the with and near"
).split()


@dataclass(frozen=True)
class CorpusItem:
    """One listed URL: the file it serves (None for a 404) and what the file is."""

    name: str  # path below /img/
    fmt: str  # "jpg" | "png" | "webp"
    width: int  # px
    height: int  # px
    kind: str  # "ok" | "truncated" | "missing"
    caption: str


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """Long side uniform in 64..1024 px, aspect ratio from common web shapes or random in 1:2.5..2.5:1."""
    long_side = int(rng.integers(64, 1025))
    ratios = (1.0, 4 / 3, 3 / 2, 16 / 9, 1.25, None)
    r = ratios[int(rng.integers(len(ratios)))]
    r = float(rng.uniform(1.0, 2.5)) if r is None else r
    short_side = max(16, int(round(long_side / r)))
    return (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int, channels: int) -> np.ndarray:
    """Noise of about ``cells`` blobs along the long side, bicubic-upsampled to w x h, roughly unit variance."""
    gw = max(2, int(round(cells * w / max(w, h))))
    gh = max(2, int(round(cells * h / max(w, h))))
    out = np.empty((h, w, channels), np.float32)
    for c in range(channels):
        small = Image.fromarray(rng.normal(0, 1, (gh, gw)).astype(np.float32), "F")
        out[..., c] = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))
    return out


def _gradient(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A linear gradient between two random colours at a random angle."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx * math.cos(theta) + yy * math.sin(theta)) / max(w, h)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    return (a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]).astype(np.float32)


def _shapes(rng: np.random.Generator, img: Image.Image, n: int, fill_alpha: bool = False) -> None:
    """Draw ``n`` random ellipses, rectangles and polygons (some outlined, some filled) onto ``img``."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3)) + (
            (int(rng.integers(120, 256)),) if fill_alpha else ()
        )
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(4, max(5, w // 2))), y0 + int(rng.integers(4, max(5, h // 2)))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour if rng.random() < 0.5 else None, outline=colour, width=3)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour if rng.random() < 0.5 else None, outline=colour, width=2)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Photo-like RGB: gradient, smooth noise at three scales, shapes, then blur-free sensor grain."""
    acc = _gradient(rng, w, h)
    acc += 45 * _smooth_noise(rng, w, h, 5, 3) + 20 * _smooth_noise(rng, w, h, 24, 3)
    acc += 8 * _smooth_noise(rng, w, h, max(48, max(w, h) // 6), 1)
    img = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), "RGB")
    _shapes(rng, img, int(rng.integers(3, 12)))
    arr = np.asarray(img, np.float32) + rng.normal(0, float(rng.uniform(2, 7)), (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def illustration(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Illustration-like image for PNG: gradient and shapes, little noise; RGBA, palette or RGB."""
    base = _gradient(rng, w, h) + 6 * _smooth_noise(rng, w, h, 8, 3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    style = rng.random()
    if style < 0.25:  # transparent background with opaque-ish shapes
        img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        _shapes(rng, img, int(rng.integers(4, 14)), fill_alpha=True)
        return img
    _shapes(rng, img, int(rng.integers(4, 14)))
    if style < 0.45:
        return img.quantize(colors=int(rng.integers(16, 256)))
    return img


def encode_item(fmt: str, img: Image.Image, rng: np.random.Generator) -> bytes:
    """Encode like a web server's images: JPEG q75-92 (some progressive), WebP q70-90, PNG default compression."""
    buf = io.BytesIO()
    if fmt == "jpg":
        if rng.random() < 0.05:
            img = img.convert("L")
        img.save(buf, "JPEG", quality=int(rng.integers(75, 93)), progressive=bool(rng.random() < 0.15))
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=int(rng.integers(70, 91)), method=4)
    else:
        img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def _caption(rng: np.random.Generator) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 12))))


def _make_item(args: tuple[int, int, str]) -> CorpusItem:
    """Generate item ``i`` (deterministic in seed and i, whatever the order) and write its file."""
    seed, i, root = args
    rng = np.random.default_rng([seed, i])
    r = rng.random()
    fmt = "jpg" if r < FORMAT_MIX[0][1] else "png" if r < FORMAT_MIX[0][1] + FORMAT_MIX[1][1] else "webp"
    w, h = _size(rng)
    fate = rng.random()
    kind = (
        "missing" if fate < MISSING_FRACTION else "truncated" if fate < MISSING_FRACTION + TRUNCATED_FRACTION else "ok"
    )
    name = f"{i:06d}.{fmt}"
    caption = _caption(rng)
    if kind == "missing":
        return CorpusItem(f"missing-{name}", fmt, w, h, kind, caption)
    img = illustration(rng, w, h) if fmt == "png" else photo(rng, w, h)
    data = encode_item(fmt, img, rng)
    if kind == "truncated":
        data = data[: int(len(data) * rng.uniform(0.4, 0.8))]
    with open(os.path.join(root, name), "wb") as f:
        f.write(data)
    return CorpusItem(name, fmt, w, h, kind, caption)


def build_corpus(cache_dir: str, n: int, seed: int, workers: int = 2) -> tuple[str, list[CorpusItem]]:
    """The corpus of ``n`` items for ``seed`` under ``cache_dir``, generated once (in ``workers`` processes)."""
    root = os.path.join(cache_dir, f"corpus-v{CORPUS_VERSION}-n{n}-s{seed}")
    index = os.path.join(root, "index.json")
    if os.path.exists(index):
        with open(index) as f:
            return root, [CorpusItem(**d) for d in json.load(f)]
    files = os.path.join(root, "img")
    os.makedirs(files, exist_ok=True)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        items = list(pool.map(_make_item, [(seed, i, files) for i in range(n)], chunksize=16))
    with open(index + ".tmp", "w") as f:
        json.dump([it.__dict__ for it in items], f)
    os.replace(index + ".tmp", index)
    return root, items


# ------------------------------------------------------------------------------------------------------- server


def _serve_main(root: str, hosts: list[str], conn) -> None:
    """Child process: load every file of ``root/img`` into memory and serve it under /img/ until killed."""
    import asyncio

    from aiohttp import web

    files = os.path.join(root, "img")
    blobs = {}
    for name in os.listdir(files):
        with open(os.path.join(files, name), "rb") as f:
            blobs[f"/img/{name}"] = (f.read(), CONTENT_TYPES[name.rsplit(".", 1)[1]])

    async def handle(request: web.BaseRequest) -> web.Response:
        hit = blobs.get(request.path)  # the query string (?i=N) is ignored
        if hit is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=hit[0], content_type=hit[1])

    async def main() -> None:
        server = web.Server(handle, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        port = 0
        for host in hosts:
            site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # every host on the same port
        conn.send(port)
        await asyncio.Event().wait()

    asyncio.run(main())


class ImageServer:
    """The corpus served from a child process on 127.0.0.1 (and 127.0.0.N for ``hosts`` > 1), one port."""

    def __init__(self, root: str, hosts: int = 1):
        self.hosts = [f"127.0.0.{i + 1}" for i in range(hosts)]
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_main, args=(root, self.hosts, child), daemon=True)
        self.process.start()
        if not parent.poll(120):
            self.process.kill()
            raise RuntimeError("image server did not start")
        self.port = parent.recv()

    def url(self, name: str, i: int = 0) -> str:
        """URL of ``name`` on host number ``i`` (modulo the host count)."""
        return f"http://{self.hosts[i % len(self.hosts)]}:{self.port}/img/{name}"

    def close(self) -> None:
        """Stop the server process."""
        self.process.kill()
        self.process.join(10)

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_server(urls: list[str], seconds: float = 5.0, connections: int = 64) -> dict:
    """Requests/s and MB/s a trivial keep-alive aiohttp client gets from the server (a lower bound on its speed)."""
    import asyncio
    import time

    import aiohttp

    async def main() -> dict:
        done = {"n": 0, "bytes": 0}
        stop = time.monotonic() + seconds
        conn = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
        async with aiohttp.ClientSession(connector=conn, trust_env=False) as session:

            async def worker(k: int) -> None:
                j = k
                while time.monotonic() < stop:
                    async with session.get(urls[j % len(urls)]) as r:
                        done["bytes"] += len(await r.read())
                    done["n"] += 1
                    j += connections

            t0 = time.monotonic()
            await asyncio.gather(*(worker(k) for k in range(connections)))
            dt = time.monotonic() - t0
        return {"requests_per_s": done["n"] / dt, "mb_per_s": done["bytes"] / dt / 1e6, "seconds": dt}

    return asyncio.run(main())
