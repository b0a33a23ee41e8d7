"""Scenes of the demo web site: one or two coloured shapes on a background, their rendering and their captions."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "white", "black")
BACKGROUNDS = ("white", "black", "gray", "beige", "light blue", "navy", "dark green")
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")

RGB = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "yellow": (245, 215, 40),
    "orange": (245, 135, 25),
    "purple": (125, 50, 170),
    "pink": (245, 135, 190),
    "brown": (120, 75, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUND_RGB = {
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
    "beige": (230, 215, 180),
    "light blue": (170, 205, 235),
    "navy": (20, 30, 80),
    "dark green": (25, 70, 40),
}
MIN_CONTRAST = 120.0  # Euclidean RGB distance a background keeps from every shape colour in its scene
_PAIR_AXES = ({"left", "right"}, {"top", "bottom"})


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # "small" | "large"
    position: str  # one of POSITIONS; a two-shape scene uses left/right or top/bottom


@dataclass(frozen=True)
class SceneSpec:
    """A scene: one or two shapes on a plain (optionally textured) background."""

    shapes: tuple[ShapeSpec, ...]
    background: str  # one of BACKGROUNDS
    variant: int = 0  # seeds the small jitter, rotation and background texture; 0 = plain, centred, unrotated


def _contrast_ok(colour: str, background: str) -> bool:
    return math.dist(RGB[colour], BACKGROUND_RGB[background]) > MIN_CONTRAST


def backgrounds_for(colours) -> list[str]:
    """The backgrounds that stay distinguishable from all of ``colours``."""
    colours = tuple(colours)
    return [bg for bg in BACKGROUNDS if all(_contrast_ok(c, bg) for c in colours)]


def random_scene(rng: random.Random, p_two: float = 0.35) -> SceneSpec:
    """Draw a random valid scene (one shape, or two with probability ``p_two``)."""
    while True:
        if rng.random() < p_two:
            axis = ("left", "right") if rng.random() < 0.7 else ("top", "bottom")
            shapes = tuple(ShapeSpec(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), pos) for pos in axis)
            if (shapes[0].shape, shapes[0].colour) == (shapes[1].shape, shapes[1].colour):
                continue
        else:
            size = rng.choice(SIZES)
            pos = "center" if size == "large" or rng.random() < 0.4 else rng.choice(POSITIONS[1:])
            shapes = (ShapeSpec(rng.choice(SHAPES), rng.choice(COLOURS), size, pos),)
        bgs = backgrounds_for(s.colour for s in shapes)
        if bgs:
            return SceneSpec(shapes, rng.choice(bgs), rng.randrange(1, 2**31))


def different_scene(spec: SceneSpec, rng: random.Random) -> SceneSpec:
    """A random scene whose (shape, colour) content differs from ``spec``'s (for mismatched captions)."""
    own = sorted((s.shape, s.colour) for s in spec.shapes)
    while True:
        other = random_scene(rng)
        if sorted((s.shape, s.colour) for s in other.shapes) != own:
            return other


def scene_attributes(spec: SceneSpec) -> dict:
    """The scene as a JSON-able dict: {"shapes": [{shape, colour, size, position}], "background"}."""
    return {
        "shapes": [
            {"shape": s.shape, "colour": s.colour, "size": s.size, "position": s.position} for s in spec.shapes
        ],
        "background": spec.background,
    }


def scene_from_attributes(attrs: dict, variant: int = 0) -> SceneSpec:
    """Inverse of ``scene_attributes`` (for rendering a scene read back from ground truth)."""
    shapes = tuple(ShapeSpec(s["shape"], s["colour"], s["size"], s["position"]) for s in attrs["shapes"])
    return SceneSpec(shapes, attrs["background"], variant)


def validate_scene(spec: SceneSpec) -> None:
    """Raise ValueError (one line) if the scene uses unknown words or an impossible layout."""
    if not 1 <= len(spec.shapes) <= 2:
        raise ValueError(f"a scene has 1 or 2 shapes, got {len(spec.shapes)}")
    for s in spec.shapes:
        bad = [
            (v, allowed)
            for v, allowed in ((s.shape, SHAPES), (s.colour, COLOURS), (s.size, SIZES))
            if v not in allowed
        ]
        if bad or s.position not in POSITIONS:
            raise ValueError(f"unknown shape attribute in {s}")
    if len(spec.shapes) == 2 and {s.position for s in spec.shapes} not in _PAIR_AXES:
        raise ValueError("two shapes must be at (left, right) or (top, bottom)")
    if spec.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {spec.background!r}")


# --- rendering -------------------------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` with circumradius ``r`` around (cx, cy), rotated by ``angle`` degrees."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r * 0.78, y * r * 0.78) for x, y in pts]
    elif shape == "diamond":
        pts = [(0, -r), (0.72 * r, 0), (0, r), (-0.72 * r, 0)]
    elif shape == "triangle":
        rt = 1.12 * r  # a triangle looks smaller than a circle of the same circumradius
        pts = [(rt * math.sin(a), -rt * math.cos(a) + 0.2 * rt) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    elif shape == "hexagon":
        pts = [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = k * math.pi / 5
            pts.append((rad * math.sin(a), -rad * math.cos(a) + 0.08 * r))
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


_MAX_ROTATION = {"circle": 0, "square": 10, "diamond": 6, "triangle": 10, "star": 20, "hexagon": 30}


def _layout(spec: SceneSpec, w: int, h: int, rng: random.Random) -> list[tuple[ShapeSpec, float, float, float]]:
    """Centre (x, y) and radius, in pixels, of every shape."""
    out = []
    if len(spec.shapes) == 1:
        s = spec.shapes[0]
        m = min(w, h)
        frac = rng.uniform(0.58, 0.78) if s.size == "large" else rng.uniform(0.38, 0.46)
        r = frac * m / 2
        margin = 0.07 * m
        cx, cy = w / 2, h / 2
        if s.position == "left":
            cx = margin + r
        elif s.position == "right":
            cx = w - margin - r
        elif s.position == "top":
            cy = margin + r
        elif s.position == "bottom":
            cy = h - margin - r
        slack_x, slack_y = max(0.0, w / 2 - r - margin), max(0.0, h / 2 - r - margin)
        if s.position in ("center", "top", "bottom"):
            cx += rng.uniform(-0.25, 0.25) * slack_x
        if s.position in ("center", "left", "right"):
            cy += rng.uniform(-0.25, 0.25) * slack_y
        return [(s, cx, cy, r)]
    horizontal = spec.shapes[0].position in ("left", "right")
    for s in spec.shapes:
        k = 0 if s.position in ("left", "top") else 1
        cw, ch = (w / 2, h) if horizontal else (w, h / 2)
        x0, y0 = (k * cw, 0.0) if horizontal else (0.0, k * ch)
        m = min(cw, ch)
        frac = rng.uniform(0.8, 0.92) if s.size == "large" else rng.uniform(0.55, 0.62)
        r = frac * m / 2
        cx = x0 + cw / 2 + rng.uniform(-0.3, 0.3) * max(0.0, cw / 2 - r)
        cy = y0 + ch / 2 + rng.uniform(-0.3, 0.3) * max(0.0, ch / 2 - r)
        out.append((s, cx, cy, r))
    return out


def _background(spec: SceneSpec, w: int, h: int, rng: random.Random) -> np.ndarray:
    base = np.array(BACKGROUND_RGB[spec.background], dtype=np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    if spec.variant and rng.random() < 0.35:  # mild linear gradient
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = ((xx / max(w - 1, 1) - 0.5) * math.cos(a) + (yy / max(h - 1, 1) - 0.5) * math.sin(a)).astype(np.float32)
        img += (t * rng.uniform(20, 40))[..., None]
    return img


def render_scene(spec: SceneSpec, size: int | tuple[int, int]) -> Image.Image:
    """Render ``spec`` as an RGB image of ``size`` (int = square side, or (width, height)) with anti-aliasing."""
    validate_scene(spec)
    w, h = (size, size) if isinstance(size, int) else size
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {size}")
    rng = random.Random(spec.variant)
    img = _background(spec, w, h, rng)
    ss = 4 if max(w, h) <= 160 else (3 if max(w, h) <= 320 else 2)  # supersampling factor for the shape masks
    for s, cx, cy, r in _layout(spec, w, h, rng):
        mask = Image.new("L", (w * ss, h * ss), 0)
        draw = ImageDraw.Draw(mask)
        if s.shape == "circle":
            draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=255)
        else:
            angle = rng.uniform(-1, 1) * _MAX_ROTATION[s.shape] if spec.variant else 0.0
            draw.polygon([(x * ss, y * ss) for x, y in _polygon(s.shape, cx, cy, r, angle)], fill=255)
        alpha = np.asarray(mask.resize((w, h), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0
        img = img * (1 - alpha) + np.array(RGB[s.colour], dtype=np.float32) * alpha
    if spec.variant and rng.random() < 0.3:  # mild sensor-like noise
        img += np.random.default_rng(spec.variant).normal(0, 4, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# --- captions --------------------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_WHERE = {
    "center": "in the middle",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

_ONE = (
    "{a_cs}",
    "{a_scs}",
    "{cs}",
    "{a_scs} on {a_bg} background",
    "{a_cs} on {a_bg} background",
    "photo of {a_cs} on {bg}",
    "picture of {a_scs}",
    "{a_cs} {where}",
    "{a_scs} {where} of the picture, {bg} background",
    "{Cs} & {bg} background",
    'illustration: "{cs}"',
    "{cs} ({size})",
    "{a_cs} shape on plain {bg}",
    "clip art of {a_cs}",
)
_TWO = (
    "{cs1} and {cs2}",
    "{a_cs1} and {a_cs2}",
    "{a_cs1} and {a_cs2} on {a_bg} background",
    "{a_cs1} {rel} {a_cs2}",
    "{a_cs2} {rel_inv} {a_cs1}",
    "{a_scs1} {rel} {a_scs2}",
    "two shapes: {a_cs1} & {a_cs2}",
    "{Cs1} next to {a_cs2}, {bg} background",
    "photo of {a_cs1} and {a_cs2} on {bg}",
    '"{cs1}" and "{cs2}"',
)
_REL = {"left": ("to the left of", "to the right of"), "top": ("above", "below")}


def describe(spec: SceneSpec, rng: random.Random) -> str:
    """A caption of ``spec`` from a random template; it always names every shape's colour and shape."""
    bg = spec.background
    if len(spec.shapes) == 1:
        s = spec.shapes[0]
        cs, scs = f"{s.colour} {s.shape}", f"{s.size} {s.colour} {s.shape}"
        words = {"cs": cs, "Cs": cs.capitalize(), "a_cs": _a(cs), "a_scs": _a(scs), "size": s.size}
        words.update(bg=bg, a_bg=_a(bg), where=_WHERE[s.position])
        text = rng.choice(_ONE).format(**words)
    else:
        first, second = spec.shapes
        if first.position in ("right", "bottom"):
            first, second = second, first
        rel, rel_inv = _REL[first.position]
        words = {"bg": bg, "a_bg": _a(bg), "rel": rel, "rel_inv": rel_inv}
        for k, s in ((1, first), (2, second)):
            cs = f"{s.colour} {s.shape}"
            words.update({f"cs{k}": cs, f"Cs{k}": cs.capitalize(), f"a_cs{k}": _a(cs)})
            words[f"a_scs{k}"] = _a(f"{s.size} {cs}")
        text = rng.choice(_TWO).format(**words)
    if rng.random() < 0.15:
        text = text[0].upper() + text[1:]
    return text
