"""Untrusted image bytes in, training-ready images out: safe decoding, resizing, re-encoding and a perceptual hash.

Resize modes follow img2dataset's so that side-by-side numbers compare like with like (S = ``image_size``):

- ``keep_ratio``: the *smaller* side becomes S, the aspect ratio is kept (img2dataset ``keep_ratio``).
- ``center_crop``: the smaller side becomes S, then the centre S x S square is kept (img2dataset ``center_crop``).
- ``pad``: the *larger* side becomes S, then the image is letterboxed onto an S x S canvas of ``background``
  (img2dataset ``border``).
- ``no``: the decoded image is only re-encoded.

``upscale=False`` is img2dataset's ``resize_only_if_bigger=True``: an image whose relevant side is already <= S keeps
its size. Where img2dataset then skips the crop or the padding, this module still applies it, so every output of a
mode has one shape: ``center_crop`` keeps the centre square of side min(w, h), ``pad`` still letterboxes into S x S.

Speed comes from decoding large JPEGs at 1/2, 1/4 or 1/8 scale in the IDCT (``Image.draft``), from an area-average
(BOX) filter where the factor allows it, and from rejecting by the header's declared size before any pixel is
decoded. Safety: only JPEG/PNG/GIF/WebP/BMP/TIFF/AVIF decoders are reachable, the declared pixel count is checked
before decoding, truncated data is refused (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np

# Importing a plugin registers its decoder; _SAFE_FORMATS below limits untrusted bytes to these.
from PIL import (  # noqa: F401
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

with contextlib.suppress(ImportError):  # Pillow >= 11.2 ships an AVIF decoder
    from PIL import AvifImagePlugin  # noqa: F401

RESIZE_MODES = ("keep_ratio", "center_crop", "pad", "no")
ENCODE_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}

# Everything else (EPS runs Ghostscript, PSD, PDF, ICNS, ...) is "not_an_image": a smaller attack surface for no
# loss on the web's images.
_SAFE_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF") if f in Image.OPEN)

# Magic numbers of the formats above: bytes that start like an image but do not open are "decode_error".
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

# Filters chosen by measurement (benchmarks/image_resize_micro.py --filters, one core). img2dataset downscales with
# OpenCV INTER_AREA, an area average. Pillow's BOX is the same average at the same speed for factors >= 2 (53-59 dB
# PSNR apart) but aliases below 2 (31-34 dB), where HAMMING matches INTER_AREA within 40-46 dB for ~0.3 ms more at
# 256 px. A drafted JPEG always has a residual factor below 2, so it gets HAMMING: 42 dB from INTER_AREA on the full
# decode, at ~55% of OpenCV's decode+resize time for 2048x1536 -> 341x256. reducing_gap is not used: before BOX it
# cost 6 dB (the residual factor drops below 2) for a few percent of speed.
_UPSCALE = Image.Resampling.LANCZOS  # img2dataset upscales with Lanczos too
_DRAFT_GAP = 1.0  # JPEG: decode at the smallest 1/2^k scale that is still >= 1x the target (DCT scaling low-passes)
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ImageConfig:
    """How downloaded images are checked, resized and re-encoded."""

    image_size: int = 256  # px, S in the module docstring's resize modes
    resize_mode: str = "keep_ratio"  # one of RESIZE_MODES
    upscale: bool = False  # enlarge images smaller than image_size (img2dataset: resize_only_if_bigger=False)
    min_image_size: int = 0  # px, min(width, height) of the original below this -> "too_small"
    max_aspect_ratio: float = 0.0  # max(w, h) / min(w, h) of the original above this -> "bad_aspect_ratio"; 0 = off
    encode_format: str = "jpg"  # "jpg" | "webp" | "png"
    encode_quality: int = 95  # JPEG/WebP quality, 1..100 (PNG is lossless and ignores it)
    max_pixels: int = 40_000_000  # pixels, declared width*height above this -> "decompression_bomb" (never decoded)
    background: tuple = (255, 255, 255)  # RGB 0..255, alpha is composited on it and "pad" fills with it

    def __post_init__(self):
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))  # JSON gives a list
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {tuple(ENCODE_FORMATS)}, got {self.encode_format!r}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality must be in 1..100, got {self.encode_quality}")
        if self.min_image_size < 0:
            raise ValueError(f"min_image_size must be >= 0, got {self.min_image_size}")
        if self.max_aspect_ratio != 0 and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be 0 (off) or >= 1, got {self.max_aspect_ratio}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0..255, got {self.background}")


class ImageRejected(Exception):
    """An input that yields no image; ``reason`` is a snake_case drop reason, ``message`` says what was seen."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class ProcessedImage:
    """A re-encoded image with its sizes and hashes."""

    data: bytes  # encoded output
    ext: str  # "jpg" | "webp" | "png"
    width: int  # px, output
    height: int  # px, output
    original_width: int  # px, as displayed (after EXIF orientation), before resizing
    original_height: int  # px, as displayed (after EXIF orientation), before resizing
    original_format: str  # lower-case Pillow format name of the input: "jpeg", "png", "webp", "gif", ...
    sha256: str  # hex sha256 of the original downloaded bytes
    phash: str  # 16 hex chars, DCT perceptual hash of the output image (before encoding)


def process_image(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """Decode untrusted ``data``, check it, resize it per ``cfg`` and re-encode it; raise ImageRejected otherwise."""
    if not data:
        raise ImageRejected("empty", "0 bytes")
    img = _open(data, cfg)
    try:
        raw_w, raw_h = img.size
        _check_geometry(raw_w, raw_h, cfg)
        _check_output_size(raw_w, raw_h, cfg)
        original_format = (img.format or "unknown").lower()
        scale = _scale(raw_w, raw_h, cfg)  # rotation-invariant, so the raw (pre-EXIF) size is good for the draft
        if scale < 1:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= the needed size; a no-op for other formats
            img.draft("RGB", (math.ceil(raw_w * scale * _DRAFT_GAP), math.ceil(raw_h * scale * _DRAFT_GAP)))
        rgb, swapped = _decode_rgb(img, cfg.background)
        orig_w, orig_h = (raw_h, raw_w) if swapped else (raw_w, raw_h)
        out = _resize(rgb, orig_w, orig_h, cfg)
        buf = io.BytesIO()
        try:
            if cfg.encode_format == "png":
                out.save(buf, "PNG")
            else:  # JPEG: no optimize pass (slow), Pillow's default 4:2:0 subsampling
                out.save(buf, ENCODE_FORMATS[cfg.encode_format], quality=cfg.encode_quality)
            image_hash = phash(out)
        except (OSError, ValueError, MemoryError) as e:  # e.g. a side past JPEG's 65,500 or WebP's 16,383 px
            raise ImageRejected("encode_error", f"{out.width}x{out.height}: {type(e).__name__}: {e}"[:200]) from e
    finally:
        img.close()
    return ProcessedImage(
        data=buf.getvalue(),
        ext=cfg.encode_format,
        width=out.width,
        height=out.height,
        original_width=orig_w,
        original_height=orig_h,
        original_format=original_format,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=image_hash,
    )


def _open(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Parse the header only (Pillow is lazy) and refuse what is not an image or declares too many pixels."""
    try:
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that, inside Image.open. The warning is
        # made an error here; catch_warnings swaps a process-global filter list, so under threads it may at worst
        # let the warning print. The explicit size check below is the guard that does not depend on it.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_SAFE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("decompression_bomb", str(e)) from None
    except Image.UnidentifiedImageError:
        if data.startswith(_MAGIC) or data[8:12] == b"WEBP" or data[4:12] in (b"ftypavif", b"ftypavis"):
            raise ImageRejected("decode_error", f"bad header for its magic {data[:8]!r}") from None
        raise ImageRejected("not_an_image", f"unrecognised bytes {data[:16]!r}") from None
    except Exception as e:  # a plugin choking on a crafted header
        raise ImageRejected("decode_error", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    limit = cfg.max_pixels if Image.MAX_IMAGE_PIXELS is None else min(cfg.max_pixels, Image.MAX_IMAGE_PIXELS)
    if w * h > limit:
        img.close()
        raise ImageRejected("decompression_bomb", f"declared {w}x{h} = {w * h} pixels > {limit}")
    return img


def _check_geometry(w: int, h: int, cfg: ImageConfig) -> None:
    """Reject by the declared size, before decoding; both checks are unchanged by a 90 degree rotation."""
    if min(w, h) < 1:
        raise ImageRejected("decode_error", f"declared size {w}x{h}")
    if min(w, h) < cfg.min_image_size:
        raise ImageRejected("too_small", f"{w}x{h} < {cfg.min_image_size} px")
    if cfg.max_aspect_ratio and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise ImageRejected("bad_aspect_ratio", f"{w}x{h} > {cfg.max_aspect_ratio}")


# Largest side each output format can hold (JPEG's 16-bit header fields as libjpeg caps them, WebP's 14 bits).
_MAX_SIDE = {"jpg": 65_500, "webp": 16_383, "png": 2**31 - 1}


def _check_output_size(w: int, h: int, cfg: ImageConfig) -> None:
    """Reject, before decoding, an output that ``upscale`` would make huge: a 1x3000 strip enlarged to 256 px wide
    is 256x768000, gigabytes of pixels from a few hundred bytes. Rotation-invariant, like the checks above."""
    scale = _scale(w, h, cfg)
    if cfg.resize_mode != "keep_ratio" or scale <= 1:
        return
    ow, oh = _fit(w, h, scale, w <= h, cfg.image_size)
    if ow * oh > cfg.max_pixels or max(ow, oh) > _MAX_SIDE[cfg.encode_format]:
        raise ImageRejected("output_too_large", f"{w}x{h} enlarged to {ow}x{oh}")


def _scale(w: int, h: int, cfg: ImageConfig) -> float:
    """Output/input size factor of the resize step (1.0 = no resize)."""
    if cfg.resize_mode == "no":
        return 1.0
    side = max(w, h) if cfg.resize_mode == "pad" else min(w, h)
    scale = cfg.image_size / side
    return scale if cfg.upscale else min(scale, 1.0)


def _decode_rgb(img: Image.Image, background: tuple) -> tuple[Image.Image, bool]:
    """Decode the first frame, apply EXIF orientation, composite alpha on ``background``; True if w/h swapped."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("decompression_bomb", str(e)) from None
    except Exception as e:  # untrusted input: any decoder error is a property of the bytes
        reason = "truncated" if "truncated" in str(e).lower() or isinstance(e, EOFError) else "decode_error"
        raise ImageRejected(reason, f"{type(e).__name__}: {e}") from None
    size = img.size
    with contextlib.suppress(Exception):  # broken EXIF is metadata trouble, not pixel trouble: keep it as stored
        ImageOps.exif_transpose(img, in_place=True)
    swapped = img.size != size
    try:
        return to_rgb(img, background), swapped
    except Exception as e:
        raise ImageRejected("decode_error", f"mode {img.mode}: {type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image, background: tuple) -> Image.Image:
    """RGB with alpha (RGBA, LA, PA, P/L/RGB with a transparent colour) composited on ``background``."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _MODES_16BIT:  # 16-bit grey: scale 0..65535 to 0..255 (Pillow's convert would clip)
        raw = np.asarray(img)
        arr = raw.astype(np.int64).clip(0, 65535)
        grey = Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
        key = img.info.get("transparency")  # a PNG tRNS grey value: those pixels are transparent
        if isinstance(key, int) and not isinstance(key, bool):
            grey.putalpha(Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8), "L"))
        img = grey
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, (0, 0), rgba)  # the image's own alpha is the mask: bg * (1 - a) + fg * a
        return out
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _resize(img: Image.Image, orig_w: int, orig_h: int, cfg: ImageConfig) -> Image.Image:
    """Resize per ``cfg.resize_mode``; output sizes come from the original size, not the drafted one."""
    mode, size = cfg.resize_mode, cfg.image_size
    scale = _scale(orig_w, orig_h, cfg)
    if mode == "no":
        return img
    if mode == "center_crop":
        side = size if scale != 1 else min(orig_w, orig_h)
        m = min(img.size)
        box = ((img.width - m) / 2, (img.height - m) / 2, (img.width + m) / 2, (img.height + m) / 2)
        if (side, side) == img.size:
            return img
        if m == side:  # no resize: an integer crop
            left, top = (img.width - m) // 2, (img.height - m) // 2
            return img.crop((left, top, left + m, top + m))
        return img.resize((side, side), _filter((m, m), (side, side)), box=box)
    if mode == "keep_ratio":
        target = _fit(orig_w, orig_h, scale, orig_w <= orig_h, size)
    else:  # pad
        target = _fit(orig_w, orig_h, scale, orig_w >= orig_h, size)
    if target != img.size:
        img = img.resize(target, _filter(img.size, target))
    if mode == "pad" and img.size != (size, size):
        canvas = Image.new("RGB", (size, size), cfg.background)
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        return canvas
    return img


def _fit(w: int, h: int, scale: float, width_is_ref: bool, size: int) -> tuple[int, int]:
    """Scaled (w, h): the reference side is exactly ``size`` unless unscaled, the other side rounded, at least 1."""
    if scale == 1:
        return w, h
    if width_is_ref:
        return size, max(1, round(h * size / w))
    return max(1, round(w * size / h)), size


def _filter(src: tuple[float, float], dst: tuple[int, int]) -> Image.Resampling:
    """Resampling filter for a ``src`` -> ``dst`` size change (see the measurements above ``_UPSCALE``)."""
    factor = min(src[0] / dst[0], src[1] / dst[1])
    if factor < 1:
        return _UPSCALE
    return Image.Resampling.BOX if factor >= 2 else Image.Resampling.HAMMING


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: row k is the k-th cosine basis vector over n samples."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    mat = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    mat[0] /= np.sqrt(2)
    return mat


_DCT8x32 = _dct_matrix(32)[:8]  # only the 8 lowest frequencies are kept, so only their rows are needed


def phash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex chars: 32x32 grey, 2-D DCT, 8x8 lowest frequencies > their median."""
    grey = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    low = _DCT8x32 @ np.asarray(grey, dtype=np.float64) @ _DCT8x32.T
    bits = (low > np.median(low)).ravel()
    return np.packbits(bits).tobytes().hex()


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of the same length."""
    if len(a) != len(b):
        raise ValueError(f"hashes differ in length: {a!r} vs {b!r}")
    return (int(a, 16) ^ int(b, 16)).bit_count()


def open_rgb(img_bytes: bytes) -> Image.Image:
    """Decode to RGB as the scraper prepares images: upright (EXIF orientation), alpha on white, 16-bit grey
    scaled. Raises whatever PIL raises for bytes that do not decode."""
    with Image.open(io.BytesIO(img_bytes)) as im:
        return to_rgb(ImageOps.exif_transpose(im), (255, 255, 255)).copy()


def prepare_image(img_bytes: bytes, resolution: int) -> tuple[np.ndarray, dict]:
    """Decode, resize the shorter side to ``resolution`` (bicubic) and center crop: uint8 (r, r, 3) and the crop.

    The info dict holds ``crop`` ``[left, top, right, bottom]`` in the resized image's pixels, ``source_size``
    ``[w, h]`` of the decoded image and ``resolution``. Raises whatever PIL raises for bytes that do not decode.
    """
    img = open_rgb(img_bytes)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image {w}x{h}")
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    box = [left, top, left + resolution, top + resolution]
    if size != (w, h):  # only the crop is resampled, from its box in the source: memory stays (r, r) at any aspect
        sx, sy = w / size[0], h / size[1]
        src_box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=src_box)
    else:
        img = img.crop(tuple(box))
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy takes it as is
    return arr, {"crop": box, "source_size": [w, h], "resolution": resolution}
