"""Basic caption/image filters and the score thresholds."""

import numpy as np
import pytest

from pipeline.curate import filters
from pipeline.recipe import CurateSection


@pytest.mark.parametrize(
    "caption", ["logo", "Image", "IMG_0042.JPG", "DSC01234", "photo 3", "image #12", "spacer.gif", "  Click here. "]
)
def test_placeholders(caption):
    assert filters.is_placeholder(caption)


@pytest.mark.parametrize(
    "caption", ["a red circle on navy", "Logo of the city of Paris", "photo of a blue hexagon", ""]
)
def test_real_captions_are_not_placeholders(caption):
    assert not filters.is_placeholder(caption)


def test_basic_filters_in_order_with_reasons():
    cfg = CurateSection(clip={"model": "x"}, min_caption_words=2, max_caption_chars=20, min_image_size=32,
                        max_aspect_ratio=3, languages=["en"])  # fmt: skip
    fs = filters.basic_filters(cfg, detect_language=lambda t: "de" if "der" in t.split() else "en")
    names = [n for n, _ in fs]
    assert names == ["decode_error", "caption_too_short", "caption_too_long", "placeholder_caption",
                     "caption_language", "image_too_small", "aspect_ratio_too_large"]  # fmt: skip
    ok = {"caption": "a red circle", "width": 64, "height": 64, "error": None}
    cases = {
        "decode_error": {**ok, "error": "OSError"},
        "caption_too_short": {**ok, "caption": "red"},
        "caption_too_long": {**ok, "caption": "a red circle " * 3},
        "placeholder_caption": {**ok, "caption": "image 3"},
        "caption_language": {**ok, "caption": "der rote Kreis"},
        "image_too_small": {**ok, "original_width": 20, "original_height": 300},
        "aspect_ratio_too_large": {**ok, "original_width": 400, "original_height": 100},
    }
    for reason, row in cases.items():
        hits = [n for n, f in fs if f(row)]
        assert hits[0] == reason, (reason, hits)
    assert not [n for n, f in fs if f(ok)]


def test_fraction_threshold_is_a_percentile_with_nan_ignored():
    s = np.array([0.1, 0.5, np.nan, 0.3, 0.9, 0.7], np.float32)
    assert filters.fraction_threshold(s, 0.4) == pytest.approx(0.7)  # top 2 of 5
    assert filters.fraction_threshold(s, 1.0) == pytest.approx(0.1)
    share = filters.kept_share(s, np.array([0.0, 0.3, 0.31, 1.0]))
    assert share.tolist() == pytest.approx([1.0, 0.8, 0.6, 0.0])
