"""The sampler refuses what would silently give wrong images: non-finite model output, seeds out of range."""

import math

import pytest
import torch

import training.models.pipeline as pipeline_module
from tests.training.test_pipeline_folder import make_tiny_pipeline
from training.sample import SEED_MAX, NonFiniteOutputError, check_seeds, generate, main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("refusals")).path


@pytest.fixture
def pipe(folder):
    """A freshly loaded pipeline: each test may break its weights."""
    return pipeline_module.load_pipeline(folder)


def poison(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


@pytest.mark.parametrize(("part", "value", "named"), [("unet", math.nan, "U-Net"), ("vae", math.inf, "VAE")])
def test_non_finite_model_output_is_an_error_naming_its_source(pipe, part, value, named):
    poison(getattr(pipe, part), value)
    with pytest.raises(NonFiniteOutputError) as e:
        generate(pipe, ["a red circle", "a blue star"], steps=3, n=2, batch_size=3)
    msg = str(e.value)
    assert "non-finite" in msg and named in msg and "'a red circle'" in msg and "image 0 and 2 more" in msg
    assert "diverged" in msg and "\n" not in msg
    assert "(NaN)" in msg if part == "unet" else ("(NaN)" in msg or "(inf)" in msg)  # inf weights: inf - inf = NaN


def test_the_error_names_the_prompt_whose_image_went_non_finite(pipe, monkeypatch):
    real = type(pipe.unet).forward

    def second_prompt_diverges(self, sample, timestep, encoder_hidden_states, **kw):
        out = real(self, sample, timestep, encoder_hidden_states, **kw)
        out.sample[-1] = math.nan  # the last image of the batch: "a blue star", copy 1 (image 3)
        return out

    monkeypatch.setattr(type(pipe.unet), "forward", second_prompt_diverges)
    with pytest.raises(NonFiniteOutputError, match=r"for prompt 'a blue star' \(image 3\)"):
        generate(pipe, ["a red circle", "a blue star"], steps=2, n=2, guidance=1.0)


def test_the_cli_writes_no_image_from_a_non_finite_model(pipe, folder, tmp_path, capsys, monkeypatch):
    poison(pipe.unet, math.nan)
    monkeypatch.setattr(pipeline_module, "load_pipeline", lambda *a, **kw: pipe)
    out = tmp_path / "grid.png"
    assert main([folder, "a red circle", "--steps", "2", "-n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the model produced non-finite values (NaN)") and "\n" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("seed", "n", "named"),
    [
        (-1, 1, "seed must be in 0..2**64-1"),  # torch would silently take it as 2**64 - 1
        (2**64, 1, "seed must be in 0..2**64-1"),  # torch: "Overflow when unpacking long long"
        (SEED_MAX, 2, f"use a seed of at most {SEED_MAX - 1}"),  # image 1 would need seed 2**64
    ],
)
def test_out_of_range_seeds_are_refused_before_the_model_loads(folder, tmp_path, capsys, monkeypatch, seed, n, named):
    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline_module, "load_pipeline", no_loading)
    out = tmp_path / "o.png"
    assert main([folder, "x", "--steps", "1", "-n", str(n), "--seed", str(seed), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err and not out.exists()


def test_the_python_api_refuses_the_same_seeds(pipe):
    for seed, n in ((-1, 1), (2**64, 1), (SEED_MAX, 2), (SEED_MAX - 1, 3), (True, 1), (1.5, 1)):
        with pytest.raises(ValueError, match="seed"):
            generate(pipe, ["x"], steps=1, seed=seed, n=n)
    with pytest.raises(ValueError, match="seed"):  # 2 prompts x 1 image: seeds SEED_MAX, SEED_MAX + 1
        generate(pipe, ["x", "y"], steps=1, seed=SEED_MAX)
    top = generate(pipe, ["x"], steps=1, seed=SEED_MAX - 1, n=2)  # the last two seeds of the range
    last = generate(pipe, ["x"], steps=1, seed=SEED_MAX, n=1)
    assert (top[1:].int() - last.int()).abs().max() <= 1  # the same noise; another batch shape may round 1 step
    check_seeds(0, 0)  # nothing to generate: nothing to refuse here (generate refuses n < 1 itself)


def test_a_recipe_grid_with_an_out_of_range_seed_is_refused_before_the_model_loads(folder, tmp_path, monkeypatch):
    from flows.generate import evaluation_grid

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline_module, "load_pipeline", no_loading)
    gen = {"prompts": ["a red circle", "a blue star"], "steps": 2, "guidance": 5.0, "seed": SEED_MAX - 2, "n": 2}
    with pytest.raises(ValueError, match=r"needs seeds up to 18446744073709551616, past 2\*\*64-1"):
        evaluation_grid(folder, gen, str(tmp_path / "grid.png"))
    assert not (tmp_path / "grid.png").exists()


def test_a_non_finite_preview_grid_is_skipped_with_one_line_and_training_goes_on(pipe, tmp_path, capsys):
    from training.ldm_outputs import log_sample_grid
    from training.train_ldm import LdmTrainConfig

    poison(pipe.vae, math.inf)  # a reduced-precision overflow while decoding, say: the run's weights are fine
    cfg = LdmTrainConfig(data="d", out=str(tmp_path), sample_prompts=("a red circle",), sample_steps=2)
    entry = log_sample_grid(None, 7, pipe, cfg, tmp_path)
    assert entry["step"] == 7 and "non-finite" in entry["skipped"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("step 7: sample grid skipped: ")
    assert not (tmp_path / "samples").exists()
