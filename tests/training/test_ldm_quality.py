"""Prompt accuracy on a tiny quick run: VAE -> latents with text embeddings -> U-Net, judged against an untrained one.

The whole chain in miniature on demo scenes from training/synthetic.py (tests/training/ldm_quick_run.py, started in
a background process as the session begins): the tiny VAE trains on the images, the latent stage stores latents
plus per-token text embeddings of a (random, frozen) micro CLIP text tower, the tiny U-Net trains on those latents
(800 steps, about three minutes on one thread), and a small judge (trained on real renders) names the shape and
colour of images generated for the 60 held-out prompts at guidance 7.5. The trained model must clear a loose
shape-accuracy floor that the same pipeline with an untrained U-Net fails. At this length the shapes come first:
colours are still washed out (judged near chance), which the test prints but does not assert; the full-length
figures are in BENCHMARKS.md.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel

from tests.training import ldm_quick_run
from training.evaluate_ldm import held_out_prompts, judge_accuracy
from training.models.pipeline import load_pipeline
from training.sample import generate

torch.set_num_threads(1)

# Judge shape accuracy at guidance 7.5 on the 60 held-out prompts (2 images each; chance 1/6). Measured with these
# settings on a 2-core VM (the session's judge: 1.00 colour / 0.994 shape on real renders): untrained U-Net 0.19
# (chance), trained 0.35; colour 0.06 -> 0.17. The floor sits between.
SHAPE_FLOOR = 0.3


@pytest.fixture(scope="module")
def run(tmp_path_factory, trusted_judge, request):
    root = ldm_quick_run.wait(request.config)  # built in the background since the session began, when it was
    if root is None:
        root = tmp_path_factory.mktemp("ldmq")
        ldm_quick_run.build(root)
    return {"root": root, "judge": trusted_judge}


def accuracy(pipe, judge) -> dict:
    prompts = held_out_prompts(seed=0)
    images = generate(pipe, [p["prompt"] for p in prompts], steps=20, guidance=7.5, seed=100, n=2, batch_size=60)
    return judge_accuracy(judge, images, prompts, 2)


@pytest.mark.slow
def test_trained_model_clears_the_floor_an_untrained_one_fails(run):
    judge = run["judge"]
    assert judge.report["shape_accuracy"] >= 0.98  # verdicts count only from a judge this good on real renders
    pipe = load_pipeline(run["root"] / "ldm")
    trained = accuracy(pipe, judge)
    torch.manual_seed(1)
    pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()  # same architecture, fresh weights
    untrained = accuracy(pipe, judge)
    print(f"judge accuracy at guidance 7.5: trained {trained}, untrained {untrained}")
    assert untrained["shape"] < SHAPE_FLOOR
    assert trained["shape"] >= SHAPE_FLOOR
