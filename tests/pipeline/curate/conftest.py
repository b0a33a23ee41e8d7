"""Fixtures the curation tests share: a tiny CLIP saved to disk, and its scorer."""

import pytest

from pipeline.curate.scorer import load_scorer
from tests.pipeline.curate.helpers import make_tiny_clip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_clip(str(tmp_path_factory.mktemp("model") / "m"))


@pytest.fixture(scope="module")
def scorer(model):
    return load_scorer(model, device="cpu")
