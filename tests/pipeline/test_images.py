"""Tests for pipeline.images: resize modes, orientation, colour modes, formats, rejections, hashes, draft decoding."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from pipeline import images
from pipeline.images import ImageConfig, ImageRejected, ProcessedImage, hamming, phash, process_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int, h: int, seed: int = 0, shapes: bool = True) -> Image.Image:
    """A photo-like RGB image: smooth random fields at a few scales, fine grain and (optionally) some sharp rings."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in [(3, 80), (12, 40), (48, 20)]:
        for c in range(3):
            field = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32), "F")
            acc[..., c] += amp * np.asarray(field.resize((w, h), Image.Resampling.BICUBIC))
    acc += rng.normal(0, 3, (h, w, 3))
    img = Image.fromarray(np.clip(acc + 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6 if shapes else 0):
        x, y, r = int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(4, max(5, w // 5)))
        draw.ellipse((x - r, y - r, x + r, y + r), outline=tuple(int(v) for v in rng.integers(0, 255, 3)), width=4)
    return img


def decoded(result: ProcessedImage) -> Image.Image:
    img = Image.open(io.BytesIO(result.data))
    img.load()
    return img


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def close(pixel, expected, tol=6) -> bool:
    return all(abs(int(p) - int(e)) <= tol for p, e in zip(pixel, expected, strict=True))


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --- resize modes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "size", "upscale", "expected"),
    [
        ("keep_ratio", (600, 400), False, (384, 256)),
        ("keep_ratio", (400, 600), False, (256, 384)),
        ("keep_ratio", (300, 300), False, (256, 256)),
        ("keep_ratio", (100, 50), False, (100, 50)),
        ("keep_ratio", (100, 50), True, (512, 256)),
        ("center_crop", (600, 400), False, (256, 256)),
        ("center_crop", (400, 600), False, (256, 256)),
        ("center_crop", (100, 50), False, (50, 50)),
        ("center_crop", (100, 50), True, (256, 256)),
        ("pad", (600, 400), False, (256, 256)),
        ("pad", (400, 600), False, (256, 256)),
        ("pad", (100, 50), False, (256, 256)),
        ("pad", (100, 50), True, (256, 256)),
        ("no", (600, 400), False, (600, 400)),
        ("no", (100, 50), True, (100, 50)),
    ],
)
def test_resize_mode_output_size(mode, size, upscale, expected):
    data = encode(photo(*size), "PNG")
    result = process_image(data, ImageConfig(image_size=256, resize_mode=mode, upscale=upscale))
    assert (result.width, result.height) == expected
    assert decoded(result).size == expected
    assert (result.original_width, result.original_height) == size
    assert result.ext == "jpg" and decoded(result).format == "JPEG"


def test_center_crop_keeps_the_centre():
    img = Image.new("RGB", (900, 300), RED)
    img.paste(Image.new("RGB", (300, 300), GREEN), (300, 0))
    img.paste(Image.new("RGB", (300, 300), BLUE), (600, 0))
    out = decoded(process_image(encode(img, "PNG"), ImageConfig(resize_mode="center_crop", encode_format="png")))
    assert out.size == (256, 256)
    arr = np.asarray(out)
    assert (np.abs(arr.astype(int) - GREEN).max(axis=2) <= 2).all()


def test_pad_letterboxes_on_background():
    img = Image.new("RGB", (600, 300), RED)
    cfg = ImageConfig(resize_mode="pad", encode_format="png", background=(0, 0, 255))
    out = decoded(process_image(encode(img, "PNG"), cfg))
    assert out.size == (256, 256)
    assert out.getpixel((128, 2)) == BLUE and out.getpixel((128, 253)) == BLUE  # bars above and below
    assert out.getpixel((128, 128)) == RED and out.getpixel((1, 128)) == RED  # content spans the full width


def test_small_image_keeps_its_pixels_without_upscale():
    img = photo(120, 80)
    out = decoded(process_image(encode(img, "PNG"), ImageConfig(encode_format="png")))
    assert out.size == (120, 80)
    assert np.array_equal(np.asarray(out), np.asarray(img))


# --- orientation, colour modes ------------------------------------------------------------------------------------


def _two_halves(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), RED)
    img.paste(Image.new("RGB", (w // 2, h), BLUE), (w // 2, 0))
    return img


@pytest.mark.parametrize(("size", "expected"), [((400, 200), (200, 400)), ((2048, 1024), (256, 512))])
def test_exif_orientation_6_is_applied(size, expected):
    src = _two_halves(*size)  # red left, blue right as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = encode(src, "JPEG", quality=95, exif=exif.tobytes())
    result = process_image(data, ImageConfig(encode_format="png"))
    out = decoded(result)
    assert (result.original_width, result.original_height) == (size[1], size[0])
    assert out.size == expected
    truth = src.transpose(Image.Transpose.ROTATE_270).resize(expected)  # Pillow rotates counter-clockwise
    w, h = expected
    for xy in [(w // 2, h // 8), (w // 2, h - h // 8)]:
        assert close(out.getpixel(xy), truth.getpixel(xy), tol=30)
    assert not close(out.getpixel((w // 2, h // 8)), out.getpixel((w // 2, h - h // 8)), tol=30)


def _half_transparent(mode: str) -> bytes:
    """64x64: left half fully transparent black, right half opaque red (or white-ish grey for L modes)."""
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (32, 64), (255, 0, 0, 255)), (32, 0))
    if mode == "RGBA":
        return encode(rgba, "PNG")
    if mode == "LA":
        return encode(rgba.convert("LA"), "PNG")
    if mode == "P":
        pal = Image.new("P", (64, 64), 0)
        pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        pal.paste(1, (32, 0, 64, 64))
        return encode(pal, "PNG", transparency=0)
    if mode == "WEBP":
        return encode(rgba, "WEBP", lossless=True)
    if mode == "GIF":
        pal = Image.new("P", (64, 64), 0)
        pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        pal.paste(1, (32, 0, 64, 64))
        return encode(pal, "GIF", transparency=0)
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "WEBP", "GIF"])
def test_alpha_is_composited_on_background(mode):
    data = _half_transparent(mode)
    out = decoded(process_image(data, ImageConfig(encode_format="png")))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == WHITE  # fully transparent black -> white
    right = out.getpixel((60, 5))
    assert right == ((76, 76, 76) if mode == "LA" else RED)  # opaque pixels are kept (L of red is 76)
    green_bg = decoded(process_image(data, ImageConfig(encode_format="png", background=(0, 128, 0))))
    assert green_bg.getpixel((5, 5)) == (0, 128, 0)


def test_half_alpha_blends():
    data = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG")
    out = decoded(process_image(data, ImageConfig(encode_format="png")))
    assert close(out.getpixel((4, 4)), (127, 127, 127), tol=2)


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95)
    result = process_image(data, ImageConfig(encode_format="png"))
    out = decoded(result)
    assert out.mode == "RGB" and out.size == (64, 48)
    assert close(out.getpixel((32, 24)), RED, tol=20)


def test_16bit_grey_is_scaled_not_clipped():
    arr = np.zeros((16, 48), np.uint16)
    arr[:, 16:32] = 32896  # 128 * 257
    arr[:, 32:] = 65535
    img = Image.fromarray(arr)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decoded(process_image(data, ImageConfig(encode_format="png")))
    assert out.getpixel((8, 8)) == (0, 0, 0)
    assert out.getpixel((24, 8)) == (128, 128, 128)
    assert out.getpixel((40, 8)) == WHITE


def test_16bit_grey_with_a_transparent_value_composites_on_white():
    arr = np.full((20, 30), 20000, np.uint16)
    arr[:, :10] = 0  # the tRNS grey value below: transparent
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    assert Image.open(io.BytesIO(buf.getvalue())).info.get("transparency") == 0
    out = decoded(process_image(buf.getvalue(), ImageConfig(encode_format="png")))
    assert out.getpixel((5, 10)) == WHITE and out.getpixel((20, 10)) == (78, 78, 78)  # 20000 / 257


def test_an_upscale_past_the_pixel_or_format_limits_is_rejected_before_decoding():
    strip = encode(Image.new("RGB", (1, 3000), (200, 30, 30)), "PNG")  # ~100 bytes
    cfg = ImageConfig(image_size=256, resize_mode="keep_ratio", upscale=True)
    with pytest.raises(ImageRejected) as e:  # 256x768000: gigabytes of pixels, and past JPEG's 65,500 px
        process_image(strip, cfg)
    assert e.value.reason == "output_too_large" and "256x768000" in e.value.message
    wide = encode(Image.new("RGB", (300, 10), (200, 30, 30)), "PNG")  # 7680x256: within both limits
    assert process_image(wide, cfg).width == 7680
    with pytest.raises(ImageRejected, match="output_too_large"):  # WebP holds 16,383 px a side
        process_image(encode(Image.new("RGB", (700, 10)), "PNG"), dataclasses.replace(cfg, encode_format="webp"))


@pytest.mark.parametrize("mode", ["L", "1", "P", "I;16", "RGB"])
def test_other_modes_become_rgb(mode):
    img = photo(80, 60).convert(mode) if mode != "I;16" else Image.fromarray(np.full((60, 80), 1000, np.uint16))
    out = decoded(process_image(encode(img, "PNG" if mode != "RGB" else "TIFF"), ImageConfig(encode_format="png")))
    assert out.mode == "RGB" and out.size == (80, 60)


# --- formats ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_input_formats(fmt, name):
    src = photo(300, 200, shapes=False)
    result = process_image(encode(src, fmt), ImageConfig(image_size=100))
    assert result.original_format == name
    assert (result.width, result.height) == (150, 100)
    assert psnr(decoded(result), src.resize((150, 100), Image.Resampling.LANCZOS)) > 28


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_takes_first_frame(fmt):
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decoded(process_image(data, ImageConfig(encode_format="png")))
    assert close(out.getpixel((20, 15)), RED, tol=10)


@pytest.mark.parametrize(("fmt", "pillow_name"), [("webp", "WEBP"), ("png", "PNG"), ("jpg", "JPEG")])
def test_output_formats(fmt, pillow_name):
    src = photo(200, 100, shapes=False)  # thin saturated rings would measure chroma subsampling, not the pipeline
    result = process_image(encode(src, "PNG"), ImageConfig(image_size=64, encode_format=fmt))
    out = decoded(result)
    assert result.ext == fmt and out.format == pillow_name
    assert out.size == (128, 64) == (result.width, result.height)
    assert psnr(out, src.resize((128, 64), Image.Resampling.LANCZOS)) > (35 if fmt == "png" else 26)


# --- rejections ---------------------------------------------------------------------------------------------------


def _patch_png_size(png: bytes, w: int, h: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG (with a correct CRC): the header declares w x h, the data stays tiny."""
    assert png[12:16] == b"IHDR"
    body = struct.pack(">II", w, h) + png[24:29]
    return png[:12] + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + png[33:]


def _corrupt(data: bytes, start: float) -> bytes:
    out = bytearray(data)
    i = int(len(out) * start)
    out[i : i + 300] = b"\xff" * 300  # 0xff starts JPEG markers mid-scan; PNG fails its zlib stream
    return bytes(out)


def _noise_png(w=200, h=150) -> bytes:
    return encode(Image.fromarray(np.random.default_rng(3).integers(0, 255, (h, w, 3), dtype=np.uint8)), "PNG")


def _noise_jpeg(w=200, h=150) -> bytes:
    return encode(photo(w, h, 3), "JPEG", quality=95)


SMALL_PNG = encode(Image.new("L", (8, 8)), "PNG")
REJECTIONS = [
    ("empty", lambda: b"", {}),
    ("html", lambda: b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>", {}),
    ("random", lambda: b"\x00" + np.random.default_rng(0).bytes(2000), {}),
    ("eps", lambda: encode(Image.new("RGB", (8, 8)), "EPS"), {}),  # never handed to Ghostscript
    ("corrupt_png", lambda: _corrupt(_noise_png(), 0.5), {}),
    ("corrupt_jpeg", lambda: _corrupt(_noise_jpeg(), 0.4), {}),
    ("header_only_png", lambda: _noise_png()[:20], {}),
    ("truncated_jpeg", lambda: _noise_jpeg()[: len(_noise_jpeg()) // 2], {}),
    ("truncated_png", lambda: _noise_png()[: len(_noise_png()) // 2], {}),
    ("bomb_cfg", lambda: encode(Image.new("1", (2000, 1000)), "PNG"), {"max_pixels": 1_000_000}),
    ("bomb_pillow_error", lambda: _patch_png_size(SMALL_PNG, 20_000, 20_000), {"max_pixels": 10**12}),
    ("bomb_pillow_warning", lambda: _patch_png_size(SMALL_PNG, 10_000, 10_000), {"max_pixels": 10**12}),
    (
        "bomb_gif",
        lambda: (
            encode(Image.new("P", (8, 8)), "GIF")[:6]
            + struct.pack("<HH", 30_000, 30_000)
            + encode(Image.new("P", (8, 8)), "GIF")[10:]
        ),
        {},
    ),
    ("too_small", lambda: encode(photo(20, 100), "PNG"), {"min_image_size": 32}),
    ("bad_aspect", lambda: encode(photo(300, 50), "PNG"), {"max_aspect_ratio": 3.0}),
]
EXPECTED = {
    "empty": "empty",
    "html": "not_an_image",
    "random": "not_an_image",
    "eps": "not_an_image",
    "corrupt_png": "decode_error",
    "corrupt_jpeg": "decode_error",
    "header_only_png": "decode_error",
    "truncated_jpeg": "truncated",
    "truncated_png": "truncated",
    "bomb_cfg": "decompression_bomb",
    "bomb_pillow_error": "decompression_bomb",
    "bomb_pillow_warning": "decompression_bomb",
    "bomb_gif": "decompression_bomb",
    "too_small": "too_small",
    "bad_aspect": "bad_aspect_ratio",
}


@pytest.mark.parametrize(("name", "make", "overrides"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejections(name, make, overrides):
    data = make()
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageRejected) as exc:
            process_image(data, ImageConfig(**overrides))
    assert exc.value.reason == EXPECTED[name]
    assert exc.value.message and exc.value.reason in str(exc.value)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bomb_is_refused_before_decoding(monkeypatch):
    loads = []
    monkeypatch.setattr(images, "_decode_rgb", lambda img, bg: loads.append(img.size))
    data = encode(Image.new("1", (2000, 1000)), "PNG")
    assert len(data) < 5000  # tiny on disk
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        process_image(data, ImageConfig(max_pixels=1_000_000))
    assert loads == []


def test_limits_at_the_boundary_are_inclusive():
    data = encode(photo(100, 40), "PNG")
    assert process_image(data, ImageConfig(max_pixels=4000, min_image_size=40, max_aspect_ratio=2.5)).width == 100


# --- hashes -------------------------------------------------------------------------------------------------------


def test_sha256_is_of_the_original_bytes():
    data = encode(photo(300, 200), "JPEG")
    result = process_image(data, ImageConfig(image_size=64))
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.sha256 != hashlib.sha256(result.data).hexdigest()


def test_phash_survives_resize_and_reencode():
    result = process_image(encode(photo(640, 480, seed=1), "PNG"), ImageConfig())
    assert len(result.phash) == 16 and int(result.phash, 16) >= 0
    copy = decoded(result).resize((200, 150), Image.Resampling.BILINEAR)
    copy = Image.open(io.BytesIO(encode(copy, "JPEG", quality=60)))
    assert hamming(phash(copy), result.phash) <= 6
    assert phash(copy.convert("L")) == phash(copy)  # colour-blind by design
    others = [process_image(encode(photo(640, 480, seed=s), "PNG"), ImageConfig()).phash for s in (2, 3, 4)]
    assert all(hamming(o, result.phash) >= 16 for o in others)


def test_hamming():
    assert hamming("0" * 16, "f" * 16) == 64
    assert hamming("8000000000000001", "0000000000000000") == 2
    assert hamming("abcdef0123456789", "abcdef0123456789") == 0
    with pytest.raises(ValueError):
        hamming("00", "000")


# --- draft decoding -----------------------------------------------------------------------------------------------


def test_large_jpeg_is_draft_decoded_with_high_quality(monkeypatch):
    src = photo(2048, 1536, seed=5)
    data = encode(src, "JPEG", quality=95)
    seen = []
    real = images._decode_rgb

    def spy(img, background):
        rgb, swapped = real(img, background)
        seen.append(rgb.size)
        return rgb, swapped

    monkeypatch.setattr(images, "_decode_rgb", spy)
    result = process_image(data, ImageConfig(encode_format="png"))
    assert (result.width, result.height) == (341, 256)
    assert (result.original_width, result.original_height) == (2048, 1536)
    # 1536 / 256 = 6 -> the IDCT decodes at 1/4 scale: 16x fewer pixels than the full 2048x1536 decode
    assert seen == [(512, 384)]
    full = Image.open(io.BytesIO(data)).convert("RGB")
    assert full.size == (2048, 1536)
    reference = full.resize((341, 256), Image.Resampling.LANCZOS)
    assert psnr(decoded(result), reference) > 30


# --- config -------------------------------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = ImageConfig(image_size=128, resize_mode="pad", background=(1, 2, 3), max_aspect_ratio=4.0)
    again = ImageConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and isinstance(again.background, tuple)


@pytest.mark.parametrize(
    "bad",
    [
        {"resize_mode": "border"},
        {"encode_format": "gif"},
        {"image_size": 0},
        {"encode_quality": 0},
        {"max_aspect_ratio": 0.5},
        {"background": (0, 0)},
        {"max_pixels": 0},
    ],
)
def test_bad_config_fails_loudly(bad):
    with pytest.raises(ValueError):
        ImageConfig(**bad)


@pytest.mark.parametrize("fmt, size", [("jpg", (10, 70000)), ("webp", (300, 20000))])
def test_an_output_the_format_cannot_hold_is_a_counted_rejection(fmt, size):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")  # a few KB: deflate squeezes the flat colour
    cfg = ImageConfig(image_size=256, encode_format=fmt, max_pixels=50_000_000)
    with pytest.raises(ImageRejected) as err:
        process_image(buf.getvalue(), cfg)  # the short side is under 256: kept, so a side stays past the limit
    assert err.value.reason == "encode_error"
    w, h = (int(v) for v in str(err.value).split(": ")[1].split("x"))  # the output size that could not be written
    assert max(w, h) > {"jpg": 65500, "webp": 16383}[fmt]
