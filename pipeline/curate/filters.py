"""Basic per-sample filters (image size, aspect ratio, caption length, boilerplate, language) and CLIP thresholds.

Each filter is a plain function of a sample's stored metadata that returns True when the sample should be dropped;
the drop reason is the filter's name. They run on the score table written by the first pass, so changing a
setting needs no new inference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

# Alt text that says nothing about the image: site furniture, file names, stock words.
PLACEHOLDER_WORDS = frozenset(
    {
        "image", "images", "img", "photo", "photos", "picture", "pic", "pics", "graphic", "icon", "icons", "logo",
        "banner", "thumbnail", "thumb", "placeholder", "spacer", "pixel", "blank", "untitled", "default", "avatar",
        "button", "arrow", "loading", "spinner", "click here", "read more", "more", "alt", "alt text", "null",
        "undefined", "none", "n/a", "na", "todo", "photo of", "image of", "picture of", "screenshot", "share",
        "facebook", "twitter", "instagram", "linkedin", "youtube", "pinterest", "rss", "email", "print", "search",
        "menu", "close", "home", "advertisement", "ad", "sponsored", "tracking pixel", "hero image",
    }
)  # fmt: skip
_FILENAME = re.compile(r"^[\w\-. ]+\.(jpe?g|png|gif|webp|bmp|svg|tiff?|avif|heic)$", re.IGNORECASE)
_CAMERA = re.compile(r"^(img|dsc|dscn|dscf|pict|p|photo|image|screenshot|screen shot)[\s_\-]*\d+\w*$", re.IGNORECASE)
_NUMBERED = re.compile(r"^(image|photo|picture|img|pic|figure|fig)\.?\s*#?\d+$", re.IGNORECASE)


def caption_words(caption: str) -> int:
    """Number of whitespace-separated words with at least one letter or digit."""
    return sum(1 for w in caption.split() if any(c.isalnum() for c in w))


def is_placeholder(caption: str) -> bool:
    """Whether alt text is boilerplate: a stock word ("logo"), a file name ("IMG_0042.jpg") or "image 3"."""
    text = " ".join(caption.lower().split()).strip(" .:-_|")
    if not text:
        return False  # empty captions are caption_too_short
    return text in PLACEHOLDER_WORDS or bool(_FILENAME.match(text) or _CAMERA.match(text) or _NUMBERED.match(text))


def _present(value) -> bool:
    """A stored size: not None and not NaN (pandas turns a missing value in a mixed column into NaN)."""
    return value is not None and value == value and bool(value)


def _side(row: dict) -> tuple[int, int]:
    w = next((v for v in (row.get("original_width"), row.get("width")) if _present(v)), 0)
    h = next((v for v in (row.get("original_height"), row.get("height")) if _present(v)), 0)
    return int(w), int(h)


def image_too_small(row: dict, min_side: int) -> bool:
    """The original image's smaller side is below ``min_side`` px (0 = off)."""
    w, h = _side(row)
    return min_side > 0 and min(w, h) < min_side


def aspect_ratio_too_large(row: dict, max_ratio: float) -> bool:
    """max(w, h) / min(w, h) of the original is above ``max_ratio`` (0 = off)."""
    w, h = _side(row)
    return max_ratio > 0 and min(w, h) > 0 and max(w, h) / min(w, h) > max_ratio


def langid_detector() -> Callable[[str], str]:
    """A caption -> ISO 639-1 code function from the optional ``langid`` package (fails loudly if absent)."""
    try:
        import langid
    except ImportError as e:
        raise ValueError("curate.languages needs the optional package 'langid' (pip install langid)") from e
    return lambda text: langid.classify(text)[0]


def _text(row: dict) -> str:
    c = row.get("caption")
    return c if isinstance(c, str) else ""


def basic_filters(cfg, detect_language: Callable[[str], str] | None = None) -> list[tuple[str, Callable]]:
    """The enabled basic filters of a CurateSection in order: ``[(reason, row -> drop?)]``.

    ``row`` holds the sample's stored metadata: caption, width, height, original_width, original_height, error.
    """
    filters: list[tuple[str, Callable]] = [("decode_error", lambda r: isinstance(r.get("error"), str))]
    filters.append(("caption_too_short", lambda r: caption_words(_text(r)) < cfg.min_caption_words))
    filters.append(("caption_too_long", lambda r: len(_text(r)) > cfg.max_caption_chars))
    if cfg.placeholder_captions:
        filters.append(("placeholder_caption", lambda r: is_placeholder(_text(r))))
    if cfg.languages:
        detect = detect_language or langid_detector()
        allowed = set(cfg.languages)
        filters.append(("caption_language", lambda r: detect(_text(r)) not in allowed))
    if cfg.min_image_size:
        filters.append(("image_too_small", lambda r: image_too_small(r, cfg.min_image_size)))
    if cfg.max_aspect_ratio:
        filters.append(("aspect_ratio_too_large", lambda r: aspect_ratio_too_large(r, cfg.max_aspect_ratio)))
    return filters


def fraction_threshold(scores: np.ndarray, keep_fraction: float) -> float:
    """The score at which the top ``keep_fraction`` of ``scores`` (NaN and inf ignored) is kept: a global percentile.

    Ties at the threshold are kept, so slightly more than the fraction may stay.
    """
    s = np.sort(scores[np.isfinite(scores)])[::-1]
    if len(s) == 0:
        return float("inf")
    # round away float noise first: 0.28 * 25 is 7.000000000000001, whose ceiling would keep an eighth
    n_keep = max(1, math.ceil(round(keep_fraction * len(s), 9)))
    return float(s[min(n_keep, len(s)) - 1])


def kept_share(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Share of (finite) scores at or above each threshold: the threshold -> % kept table."""
    s = np.sort(scores[np.isfinite(scores)])
    if len(s) == 0:
        return np.zeros(len(thresholds))
    return 1.0 - np.searchsorted(s, thresholds, side="left") / len(s)
