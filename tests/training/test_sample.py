"""The sampler: per-image seeds, negative prompts in the unconditional branch, DDIM and DPM-Solver++, PNG grids."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from tests.training.test_pipeline_folder import make_tiny_pipeline
from training.models.pipeline import LdmPipeline, default_scheduler_config
from training.sample import generate, initial_noise, main, make_grid, make_scheduler, save_grid

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue star", "a green square"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("sample"))


def differs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.int() - b.int()).abs().float().mean())


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = generate(pipe, PROMPTS, steps=8, guidance=5.0, seed=3, n=2, batch_size=6)
    b = generate(pipe, PROMPTS, steps=8, guidance=5.0, seed=3, n=2, batch_size=6)
    c = generate(pipe, PROMPTS, steps=8, guidance=5.0, seed=4, n=2, batch_size=6)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert differs(a, c) > 5  # mean |difference| in 0..255 units
    # image i uses seed + i: seed 4 shifts the noise by one image, so copy 2 of prompt 0 at seed 3 (i = 1) is copy 1
    # at seed 4 (i = 0) only in its noise, not its prompt; with one prompt the shift is exact
    one = generate(pipe, ["a red circle"], steps=8, guidance=5.0, seed=3, n=3)
    shifted = generate(pipe, ["a red circle"], steps=8, guidance=5.0, seed=4, n=2)
    assert torch.equal(one[1:], shifted)
    assert torch.equal(initial_noise([5, 6], (4, 8, 8))[1], initial_noise([6], (4, 8, 8))[0])


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_an_image_does_not_depend_on_its_batch(pipe, scheduler):
    kw = {"steps": 8, "guidance": 5.0, "seed": 11, "n": 2, "scheduler": scheduler}
    whole = generate(pipe, PROMPTS, batch_size=6, **kw)
    ones = generate(pipe, PROMPTS, batch_size=1, **kw)
    uneven = generate(pipe, PROMPTS, batch_size=4, **kw)
    # the same noise and the same arithmetic; CPU kernels for other batch shapes may round differently in the
    # last float bit (~1e-6), which can move a rare pixel by one uint8 step and nothing more
    for other in (ones, uneven):
        d = (whole.int() - other.int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 1e-3


def test_negative_prompt_replaces_the_unconditional_branch(pipe, monkeypatch):
    seen = []
    real = type(pipe.unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, **kw):
        seen.append(encoder_hidden_states.clone())
        return real(self, sample, timestep, encoder_hidden_states, **kw)

    monkeypatch.setattr(type(pipe.unet), "forward", spy)
    generate(pipe, ["a red circle"], negative="blue", steps=2, guidance=4.0, n=2)
    blue, red = pipe.text_encoder.encode(["blue"])[0], pipe.text_encoder.encode(["a red circle"])[0]
    ctx = seen[0]
    assert len(seen) == 2 and ctx.shape == (4, 16, 32)  # [uncond x2, cond x2] per step
    assert torch.equal(ctx[0], blue) and torch.equal(ctx[1], blue) and torch.equal(ctx[2], red)
    assert not torch.allclose(blue, pipe.empty_emb, atol=1e-3)
    seen.clear()
    generate(pipe, ["a red circle"], steps=2, guidance=4.0)
    assert torch.equal(seen[0][0], pipe.empty_emb)  # no negative: the stored empty-prompt embedding
    seen.clear()
    generate(pipe, ["a red circle"], negative="blue", steps=2, guidance=1.0)
    assert seen[0].shape[0] == 1  # guidance 1 is the conditional prediction alone


def test_negative_prompt_changes_the_output_only_when_guided(pipe):
    kw = {"steps": 8, "seed": 0, "n": 2}
    plain = generate(pipe, PROMPTS, guidance=7.5, **kw)
    negative = generate(pipe, PROMPTS, negative="blue", guidance=7.5, **kw)
    per_prompt = generate(pipe, PROMPTS, negative=["blue", "red", ""], guidance=7.5, **kw)
    assert differs(plain, negative) > 1
    # negatives encoded in another batch can differ in the last float bit: at most one uint8 step on rare pixels
    for a, b in ((per_prompt[:2], negative[:2]), (per_prompt[4:], plain[4:])):
        d = (a.int() - b.int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 1e-3
    assert differs(per_prompt[2:4], plain[2:4]) > 1 and differs(per_prompt[2:4], negative[2:4]) > 1
    assert torch.equal(
        generate(pipe, PROMPTS, guidance=1.0, **kw), generate(pipe, PROMPTS, "blue", guidance=1.0, **kw)
    )
    with pytest.raises(ValueError, match="negative prompts"):
        generate(pipe, PROMPTS, negative=["blue"], steps=2)


def test_guidance_interval_guides_only_inside_it(pipe, monkeypatch):
    kw = {"steps": 8, "seed": 2, "n": 2, "guidance": 7.5}
    full = generate(pipe, PROMPTS, **kw)
    unguided = generate(pipe, PROMPTS, **{**kw, "guidance": 1.0})
    assert torch.equal(generate(pipe, PROMPTS, guidance_interval=(0, 999), **kw), full)  # every step: plain CFG
    with pytest.raises(ValueError, match="lo <= hi < 1000"):  # beyond the schedule: it would guide no step
        generate(pipe, PROMPTS, guidance_interval=(1000, 2000), **kw)
    part = generate(pipe, PROMPTS, guidance_interval=(300, 999), **kw)
    # guided at 6 of the 8 steps: between the two, nearer plain CFG
    assert 0 < differs(part, full) < differs(part, unguided) and differs(part, unguided) > 1

    seen = []
    real = type(pipe.unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, **kw):
        seen.append((int(timestep), sample.shape[0], encoder_hidden_states.clone()))
        return real(self, sample, timestep, encoder_hidden_states, **kw)

    monkeypatch.setattr(type(pipe.unet), "forward", spy)
    generate(pipe, ["a red circle"], negative="blue", steps=8, guidance=4.0, guidance_interval=(300, 999))
    red = pipe.text_encoder.encode(["a red circle"])[0]
    assert [t for t, _, _ in seen] == sorted((t for t, _, _ in seen), reverse=True) and len(seen) == 8
    for t, batch, ctx in seen:  # inside: [negative, prompt]; outside: the prompt alone, no unconditional pass
        assert batch == (2 if t >= 300 else 1) and torch.equal(ctx[-1], red)
    assert {b for _, b, _ in seen} == {1, 2}
    with pytest.raises(ValueError, match="guidance interval"):
        generate(pipe, PROMPTS, steps=2, guidance_interval=(500, 100))


def test_ddim_and_dpm_both_run_on_the_training_schedule(pipe):
    dpm = generate(pipe, PROMPTS, steps=10, scheduler="dpm")
    ddim = generate(pipe, PROMPTS, steps=10, scheduler="ddim")
    assert dpm.shape == ddim.shape == (3, 3, 32, 32)
    assert differs(dpm, ddim) > 0 and dpm.float().std() > 1 and ddim.float().std() > 1
    for name in ("dpm", "ddim"):
        s = make_scheduler(pipe.train_scheduler_config, name)
        s.set_timesteps(10)
        assert int(s.timesteps[0]) == 999 and s.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="scheduler"):
        generate(pipe, PROMPTS, scheduler="euler")


def test_grid_png_carries_its_settings(tmp_path):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    meta = {"prompt": "a red circle", "negative": "blue", "seed": 3, "steps": 20, "guidance": 7.5, "scheduler": "dpm"}
    path = save_grid(images, tmp_path / "g" / "grid.png", meta)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns, 2 rows, 2 px gaps
        assert im.text["prompt"] == "a red circle" and im.text["negative"] == "blue"
        assert json.loads(im.text["seed"]) == 3 and json.loads(im.text["guidance"]) == 7.5
        assert im.text["scheduler"] == "dpm" and json.loads(im.text["steps"]) == 20
        tile = torch.from_numpy(np.array(im)[36:68, 2:34]).permute(2, 0, 1)
    assert torch.equal(tile, images[3])  # row 1, column 0
    assert make_grid(images, cols=5).size == (5 * 34 + 2, 34 + 2)


def test_cli_writes_a_grid_and_fails_in_one_line(pipe, tmp_path, capsys):
    out = tmp_path / "cli.png"
    argv = [pipe.path, "a red circle", "--negative", "blue", "--steps", "3", "--guidance", "6", "--seed", "2"]
    assert main([*argv, "-n", "4", "--scheduler", "ddim", "--device", "cpu", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (2 * 34 + 2, 2 * 34 + 2)
        assert im.text["prompt"] == "a red circle" and im.text["negative"] == "blue" and im.text["steps"] == "3"
        assert im.text["guidance"] == "6.0" and im.text["seed"] == "2" and im.text["scheduler"] == "ddim"
        assert im.text["guidance_interval"] == "all steps"
    limited = tmp_path / "limited.png"
    assert main([*argv, "-n", "1", "--guidance-interval", "200", "999", "--out", str(limited)]) == 0
    with Image.open(limited) as im:
        assert im.text["guidance_interval"] == "200 999"
    assert main([*argv, "--guidance-interval", "900", "100", "--out", str(limited)]) == 2
    assert "guidance interval" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "a red circle", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a pipeline folder" in err[0]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--steps", "1001"], "at most the 1000 timesteps"),
        (["--guidance", "nan"], "finite"),
        (["--cols", "0"], "--cols must be >= 1"),
        (["--device", "bogus"], "unknown device"),
        (["--device", "cuda:7"], "no such CUDA device"),
        (["--guidance-interval", "1000", "5000"], "lo <= hi < 1000"),  # would silently switch guidance off
    ],
)
def test_cli_refuses_bad_settings_in_one_line(pipe, tmp_path, capsys, flags, named):
    out = tmp_path / "o.png"
    assert main([pipe.path, "x", "-n", "1", "--steps", "2", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and not out.exists()


def test_cli_refuses_an_output_it_cannot_write_before_generating(pipe, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path, tmp_path / "file" / "a.png"):
        assert main([pipe.path, "x", "-n", "1", "--steps", "2", "--out", str(out)]) == 2
        assert "give a PNG file path" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="no prompts"):
        generate(pipe, [], steps=2)


def test_an_incomplete_pipeline_folder_is_a_one_line_error(pipe, tmp_path):
    import shutil

    from training.models.pipeline import load_pipeline

    for part in ("scheduler", "empty_text_emb.npy"):
        broken = tmp_path / part.split(".")[0]
        shutil.copytree(pipe.path, broken)
        target = broken / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(ValueError, match=f"incomplete pipeline folder.*{part.split('/')[0]}"):
            load_pipeline(broken)
    index = json.loads((Path(pipe.path) / "model_index.json").read_text())
    damaged = tmp_path / "damaged"
    shutil.copytree(pipe.path, damaged)
    for text, named in [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({k: v for k, v in index.items() if k != "resolution"}), "no image resolution"),
    ]:
        (damaged / "model_index.json").write_text(text)
        with pytest.raises(ValueError, match=named) as e:
            load_pipeline(damaged)
        assert str(damaged) in str(e.value) and "\n" not in str(e.value)
    (damaged / "model_index.json").write_text(json.dumps(index))
    (damaged / "text_encoder" / "open_clip_model.safetensors").write_bytes(b"xx")  # damaged text-tower weights
    with pytest.raises(ValueError, match="cannot load CLIP model") as e:
        load_pipeline(damaged)
    assert "\n" not in str(e.value)


class GaussianOracle(torch.nn.Module):
    """The exact noise predictor when every latent element is x0 ~ N(mu, s^2), mu read from the conditioning."""

    def __init__(self, prediction_type: str, s: float):
        super().__init__()
        self.ac = DDPMScheduler(**default_scheduler_config(prediction_type)).alphas_cumprod.double()
        self.prediction_type, self.s = prediction_type, s
        self.config = SimpleNamespace(in_channels=4, sample_size=8)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def forward(self, x, t, encoder_hidden_states):
        ab = self.ac[int(t)]
        a, b = ab.sqrt(), (1 - ab).sqrt()
        mu = encoder_hidden_states.double().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        x = x.double()
        x0 = mu + a * self.s**2 * (x - a * mu) / (ab * self.s**2 + 1 - ab)  # E[x0 | x_t] of a Gaussian
        eps = (x - a * x0) / b
        return SimpleNamespace(sample=(eps if self.prediction_type == "epsilon" else a * eps - b * x0).float())


class NumberEncoder:
    """A text encoder whose embedding of "0.5" is 0.5 everywhere (the oracle's mu)."""

    def encode(self, texts):
        return torch.stack([torch.full((4, 8), float(t or 0)) for t in texts])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_recover_gaussian_data_from_its_exact_denoiser(prediction_type, monkeypatch):
    import training.models.vae as vae_module

    latents = []
    monkeypatch.setattr(vae_module, "decode_latents", lambda vae, z: latents.append(z) or torch.zeros(len(z), 3, 4, 4))
    mu, s = 0.5, 0.5
    sched = default_scheduler_config(prediction_type)
    vae = SimpleNamespace(config={"block_out_channels": [16, 32, 64]})  # 4x downsampling: 32 px <-> 8x8 latents
    pipe = LdmPipeline(GaussianOracle(prediction_type, s), vae, NumberEncoder(), sched, prediction_type, 32,
                       torch.zeros(4, 8))  # fmt: skip
    # Stable Diffusion's schedule keeps a little signal at t = 999 (alpha_bar ~ 0.0047) that pure noise lacks, so
    # the exact flow maps N(0, 1) to mean mu (1 - s a_T / sigma_T) and std s / sigma_T, not exactly (mu, s)
    a_t = float(DDPMScheduler(**sched).alphas_cumprod[-1]) ** 0.5
    sigma_t = (a_t**2 * s**2 + 1 - a_t**2) ** 0.5
    want_mean, want_std = mu * (1 - s * a_t / sigma_t), s / sigma_t
    for scheduler, steps, std_tol in (("ddim", 1000, 0.02), ("dpm", 20, 0.1)):
        latents.clear()
        generate(pipe, ["0.5"], steps=steps, guidance=1.0, n=64, scheduler=scheduler, batch_size=64)
        z = latents[0]
        assert float(z.mean()) == pytest.approx(want_mean, abs=0.01), scheduler
        assert float(z.std()) == pytest.approx(want_std, rel=std_tol), scheduler
    # guidance extrapolates from the unconditional branch: away from empty (mu 0), or from the negative (mu 1)
    latents.clear()
    generate(pipe, ["0.5"], steps=20, guidance=3.0, n=16)
    generate(pipe, ["0.5"], negative="1.0", steps=20, guidance=3.0, n=16)
    assert float(latents[0].mean()) == pytest.approx(0 + 3.0 * (mu - 0), rel=0.06)
    assert float(latents[1].mean()) == pytest.approx(1.0 + 3.0 * (mu - 1.0), rel=0.06)


class ExactX0(GaussianOracle):
    """The noise predictor of data that is always x0 = 0.3: its samples must end exactly there."""

    def forward(self, x, t, encoder_hidden_states):
        ab = self.ac[int(t)]
        eps = (x.double() - ab.sqrt() * 0.3) / (1 - ab).sqrt()
        return SimpleNamespace(sample=eps.float())


@pytest.mark.parametrize("steps", [15, 20, 24])
def test_both_samplers_end_on_a_clean_sample_for_any_step_count(steps, monkeypatch):
    import training.models.vae as vae_module

    latents = []
    monkeypatch.setattr(vae_module, "decode_latents", lambda vae, z: latents.append(z) or torch.zeros(len(z), 3, 4, 4))
    vae = SimpleNamespace(config={"block_out_channels": [16, 32, 64]})
    sched = default_scheduler_config("epsilon")
    pipe = LdmPipeline(ExactX0("epsilon", 1.0), vae, NumberEncoder(), sched, "epsilon", 32, torch.zeros(4, 8))
    for scheduler in ("ddim", "dpm"):  # diffusers' DDIM scheduler stopped at t = 0's noise for 15 and 24 steps
        latents.clear()
        generate(pipe, ["0"], steps=steps, guidance=1.0, n=2, scheduler=scheduler)
        assert float((latents[0] - 0.3).abs().max()) < 1e-3, (scheduler, float((latents[0] - 0.3).abs().max()))


def test_a_pipeline_folder_whose_parts_do_not_fit_is_a_one_line_error(pipe, tmp_path):
    import shutil

    from training.models.pipeline import load_pipeline

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(pipe.path, folder)
        change(folder)
        return folder

    def edit_index(**changes):
        def change(folder):
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({**index, **changes}))

        return change

    cases = [
        ("noweights", lambda f: (f / "text_encoder" / "open_clip_model.safetensors").unlink(), "without weights"),
        ("emb-shape", lambda f: np.save(f / "empty_text_emb.npy", np.zeros((7, 3), np.float32)), "different models"),
        ("emb-text", lambda f: np.save(f / "empty_text_emb.npy", np.array(["a", "b"])), "not 2-D float"),
        ("emb-null", edit_index(empty_text_emb=None), "not a file name"),
        ("res-bool", edit_index(resolution=True), "no image resolution"),
        ("res-odd", edit_index(resolution=30), "not a multiple of 4"),
        (
            "sched-list",
            lambda f: (f / "scheduler" / "scheduler_config.json").write_text("[1, 2]"),
            "expected a JSON object",
        ),
        (
            "sched-str",
            lambda f: (f / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": "9"}'),
            "not a positive integer",
        ),  # fmt: skip
    ]
    for name, change, named in cases:
        with pytest.raises(ValueError, match=named) as e:
            load_pipeline(broken(name, change))
        assert "\n" not in str(e.value), name


def test_an_undecodable_prompt_byte_is_written_as_a_replacement_character(pipe, tmp_path, capsys):
    out = tmp_path / "u.png"
    assert main([pipe.path, "a red \udcff circle", "--steps", "2", "-n", "1", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.text["prompt"] == "a red \ufffd circle" and json.loads(im.text["prompts"]) == ["a red \ufffd circle"]
        assert im.text["seeds"].startswith("image i, row by row, uses seed + i") and im.text["precision"] == "auto"
