"""LDM evaluation: the measures on cases known by construction, and the whole report on a tiny untrained model."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from pipeline.demo_site import COLOURS, SHAPES
from pipeline.demo_site.scenes import BACKGROUND_RGB, RGB, backgrounds_for
from tests.training.test_pipeline_folder import make_tiny_pipeline
from training.evaluate_ldm import (
    LdmEvalConfig,
    check_targets,
    default_clip,
    evaluate_pipeline,
    held_out_prompts,
    judge_accuracy,
    load_clip_judge,
    main,
    negative_prompt_check,
    real_renders,
    text_separation,
)
from training.image_measures import frechet_distance, hue_ambiguous, hue_mass, pixel_share
from training.judge import Judge, JudgeConfig, JudgeNet, save_judge

torch.set_num_threads(1)


def filled(rgb, n=2, size=8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, size, size).contiguous()


class FixedJudge:
    """A stand-in judge that always answers red circle."""

    def predict(self, images):
        return {"colour": ["red"] * len(images), "shape": ["circle"] * len(images)}


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(40000, 4, generator=g, dtype=torch.float64) * 2 + 1
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 = 4 * 1 + 4 * (1 - 2)^2
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.03)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8
    rot = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    assert frechet_distance(a @ rot, b @ rot) == pytest.approx(frechet_distance(a, b), rel=1e-6)  # rotation-free
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


def test_colour_measures_by_construction():
    red, navy = filled(RGB["red"]), filled((20, 30, 80))
    assert pixel_share(red, "red") == 1.0 and pixel_share(red, "blue") == 0.0
    half = torch.cat([red[:, :, :4], navy[:, :, 4:]], dim=2)
    assert pixel_share(half, "red") == 0.5 and pixel_share(navy, "blue") == 0.0  # a navy background is not blue
    assert hue_mass(red, "red") > 0.7 and hue_mass(red, "blue") == 0.0
    assert hue_mass(half, "red") == pytest.approx(hue_mass(red, "red") / 2)
    with pytest.raises(ValueError, match="no hue"):
        hue_mass(red, "white")


def test_held_out_prompts_and_their_real_renders():
    prompts = held_out_prompts(seed=3)
    assert len(prompts) == len(COLOURS) * len(SHAPES) == len({p["prompt"] for p in prompts})
    assert {(p["colour"], p["shape"]) for p in prompts} == {(c, s) for c in COLOURS for s in SHAPES}
    for p in prompts:
        assert f"{p['colour']} {p['shape']}" in p["prompt"]
        assert p["background"] is None or (
            p["background"] in backgrounds_for([p["colour"]]) and "background" in p["prompt"]
        )
    images = real_renders(prompts[:12], 2, 32, seed=0)
    assert images.shape == (24, 3, 32, 32) and images.dtype == torch.uint8
    for i, p in enumerate(prompts[:12]):
        if p["colour"] not in ("white", "black"):
            assert pixel_share(images[2 * i : 2 * i + 2], p["colour"]) > 0.02


def test_judge_accuracy_counts_per_prompt():
    prompts = [
        {"colour": "red", "shape": "circle"},
        {"colour": "red", "shape": "star"},
        {"colour": "blue", "shape": "star"},
    ]
    r = judge_accuracy(FixedJudge(), torch.zeros(6, 3, 8, 8, dtype=torch.uint8), prompts, n=2)
    assert r == {"colour": pytest.approx(4 / 6), "shape": pytest.approx(2 / 6), "both": pytest.approx(2 / 6), "n": 6}


def test_targets_need_guidance_to_help():
    cfg = LdmEvalConfig(guidances=(1.0, 7.5), steps=(20,))
    rows = [{"guidance": 1.0, "steps": 20, "judge": {"colour": 0.8, "shape": 0.6}},
            {"guidance": 7.5, "steps": 20, "judge": {"colour": 0.97, "shape": 0.93}}]  # fmt: skip
    neg = {"mean_pixel_share_ratio": 0.3, "colours": {"red": {"pixel_share_ratio": 0.3}}}
    ok = check_targets({"settings": rows}, neg, cfg)
    assert ok == {"guidance_raises_accuracy": {"20": True}, "colour_accuracy_ge_0.95": True,
                  "shape_accuracy_ge_0.90": True, "negative_halves_colour": True}  # fmt: skip
    rows[1]["judge"] = {"colour": 0.97, "shape": 0.5}
    neg["colours"]["red"]["pixel_share_ratio"] = 0.7
    bad = check_targets({"settings": rows}, neg, cfg)
    assert bad["guidance_raises_accuracy"]["20"] is False and bad["shape_accuracy_ge_0.90"] is False
    assert bad["negative_halves_colour"] is False
    untrusted = check_targets({"settings": rows}, neg, cfg, judge_trusted=False)  # its verdicts do not count
    assert untrusted["guidance_raises_accuracy"] == {"20": None}
    assert untrusted["colour_accuracy_ge_0.95"] is None and untrusted["shape_accuracy_ge_0.90"] is None
    assert check_targets({"settings": rows}, {"colours": {}}, cfg)["negative_halves_colour"] is None  # nothing tested


def test_targets_are_checked_at_the_target_guidance_not_the_largest():
    rows = [{"guidance": 1.0, "steps": 20, "judge": {"colour": 0.8, "shape": 0.6}},
            {"guidance": 7.5, "steps": 20, "judge": {"colour": 0.97, "shape": 0.93}},
            {"guidance": 12.0, "steps": 20, "judge": {"colour": 0.6, "shape": 0.4}}]  # fmt: skip
    neg = {"skipped": "negative_n = 0"}
    got = check_targets({"settings": rows}, neg, LdmEvalConfig(guidances=(1.0, 7.5, 12.0), steps=(20,)))
    assert got["colour_accuracy_ge_0.95"] is True and got["guidance_raises_accuracy"] == {"20": True}
    low = LdmEvalConfig(guidances=(0.5, 1.0), steps=(20,), target_guidance=0.5)  # not the unguided row
    assert check_targets({"settings": rows[:1]}, neg, low)["colour_accuracy_ge_0.95"] is None
    five = [{**rows[0]}, {"guidance": 5.0, "steps": 20, "judge": {"colour": 0.96, "shape": 0.91}}]
    swept = check_targets({"settings": five}, neg, LdmEvalConfig(guidances=(1.0, 5.0), steps=(20,)))
    assert swept["colour_accuracy_ge_0.95"] is True  # 7.5 not swept: the largest guidance that was
    with pytest.raises(ValueError, match="not one of the guidances"):
        LdmEvalConfig(guidances=(1.0, 5.0), target_guidance=7.5)


def test_evaluation_settings_out_of_range_are_refused():
    for bad in ({"negative_guidance": 0.0}, {"guidances": (float("nan"),)}, {"guidance_interval": (900, 100)}):
        with pytest.raises(ValueError, match="out of range"):
            LdmEvalConfig(**bad)


def test_hue_mass_is_not_reported_for_colours_hue_cannot_separate():
    assert hue_ambiguous("brown") == "orange" and hue_ambiguous("orange") == "brown"
    assert hue_ambiguous("blue") is None
    with pytest.raises(ValueError, match="use pixel_share"):
        hue_mass(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "brown")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalldm")
    pipe = make_tiny_pipeline(tmp)
    torch.manual_seed(0)
    judge = Judge(JudgeNet(8).eval(), JudgeConfig(width=8), {"colour_accuracy": 0.1, "shape_accuracy": 0.2})
    save_judge(judge, tmp / "judge")
    return {"pipe": pipe, "judge": judge, "tmp": tmp}


def test_negative_check_tests_the_colours_the_images_show(monkeypatch):
    import training.sample

    def fake_generate(pipe, prompts, negative=None, n=1, **kw):  # 64 pixels: 40 red, 2 blue, 12 white, 10 grey
        px = [RGB["red"]] * 40 + [RGB["blue"]] * 2 + [RGB["white"]] * 12 + [BACKGROUND_RGB["gray"]] * 10
        px = [BACKGROUND_RGB["gray"] if negative and RGB.get(negative) == p else p for p in px]
        img = torch.tensor(px, dtype=torch.uint8).T.reshape(3, 8, 8)
        return img.expand(len(prompts) * n, 3, 8, 8).clone()

    monkeypatch.setattr(training.sample, "generate", fake_generate)
    cfg = LdmEvalConfig(negative_n=1)
    out = negative_prompt_check(object(), cfg)
    assert list(out["colours"]) == ["red", "blue"]  # most present first; absent colours and white are not tested
    assert out["pixel_share_without"]["white"] == pytest.approx(12 / 64)
    assert out["pixel_share_without"]["red"] == pytest.approx(40 / 64) and out["pixel_share_without"]["green"] == 0
    assert out["colours"]["red"]["pixel_share_with"] == 0 and out["colours"]["blue"]["pixel_share_ratio"] == 0
    sweep = {"settings": []}
    assert check_targets(sweep, out, cfg)["negative_halves_colour"] is True
    given = negative_prompt_check(object(), replace(cfg, negative_colours=("green", "red")))
    assert list(given["colours"]) == ["green", "red"] and given["colours"]["green"]["pixel_share_ratio"] is None
    assert check_targets(sweep, given, cfg)["negative_halves_colour"] is False  # nothing green to remove


def fractions(d: dict) -> list[float]:
    return [v for k, v in d.items() if k != "n"]


def test_report_on_an_untrained_model(tiny):
    cfg = LdmEvalConfig(
        guidances=(1.0, 5.0), steps=(2, 20), n_per_prompt=1, negative_colours=("red", "white"), negative_n=1,
        negative_steps=2, n_real=1, batch_size=64,
    )  # fmt: skip
    clip = load_clip_judge(str(tiny["tmp"] / "model" / "text_encoder"), device="cpu")
    report = evaluate_pipeline(tiny["pipe"], tiny["judge"], cfg, clip, grid_dir=str(tiny["tmp"] / "grids"))
    report = json.loads(json.dumps(report))  # JSON-able
    assert [(r["guidance"], r["steps"]) for r in report["sweep"]["settings"]] == [
        (1.0, 2),
        (5.0, 2),
        (1.0, 20),
        (5.0, 20),
    ]
    for row in report["sweep"]["settings"]:
        assert row["judge"]["n"] == 60
        for v in fractions(row["judge"]) + fractions(row["clip_zeroshot"]) + fractions(row["clip_agrees_with_judge"]):
            assert 0.0 <= v <= 1.0
        assert math.isfinite(row["frechet_clip"]) and row["frechet_clip"] >= -1e-9
    real = report["sweep"]["real"]
    assert 0 <= real["judge"]["colour"] <= 1 and real["frechet_clip_real_vs_real"] >= -1e-9
    vae_ref = real["judge_on_vae_reconstructions"]
    assert 0 <= vae_ref["colour"] <= 1 and vae_ref["n"] == 60 and vae_ref["psnr_db"] < 20  # an untrained VAE
    neg = report["negative"]["colours"]
    assert set(neg) == {"red", "white"} and "hue_mass_with" in neg["red"] and "hue_mass_with" not in neg["white"]
    assert all(0 <= neg[c][k] <= 1 for c in neg for k in ("pixel_share_with", "pixel_share_without"))
    assert report["judge"]["trusted"] is False and any("do not count" in n for n in report["notes"])
    assert any("Inception" in n for n in report["notes"])
    assert set(report["checks"]) >= {"guidance_raises_accuracy", "colour_accuracy_ge_0.95", "negative_halves_colour"}
    assert report["checks"]["colour_accuracy_ge_0.95"] is None  # the judge is untrusted: no verdict either way
    fd = real["frechet_samples"]
    assert fd["real"] == 60 and fd["generated"] == 60 and fd["feature_dim"] > 0
    assert any("biased upwards" in n for n in report["notes"])  # 60 samples in the CLIP's embedding width
    assert set(report["text_separation"]) == {"shape", "colour"}
    assert len(list((tiny["tmp"] / "grids").glob("heldout_*.png"))) == 4


def test_text_separation_finds_the_words_a_tower_merges(tiny):
    enc = copy.deepcopy(tiny["pipe"].text_encoder)
    sep = text_separation(enc)
    for k in ("shape", "colour"):
        assert -1 <= sep[k]["mean_cosine"] <= sep[k]["max_cosine"] <= 1 + 1e-6
        assert len(set(sep[k]["closest"])) == 2
    assert sep["shape"]["max_cosine"] < 0.999  # a random tower keeps the shape words apart
    # give "square" the token embedding of "circle": the tower can no longer tell them apart
    circle, square = (int(enc.tokenizer([w])[0][1]) for w in ("circle", "square"))
    with torch.no_grad():
        enc.model.token_embedding.weight[square] = enc.model.token_embedding.weight[circle]
    merged = text_separation(enc)
    assert merged["shape"]["closest"] in (["circle", "square"], ["square", "circle"])
    assert merged["shape"]["max_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert merged["shape"]["mean_cosine"] > sep["shape"]["mean_cosine"]
    assert merged["colour"] == sep["colour"]  # the colour words are untouched


def test_cli_writes_the_report(tiny, tmp_path):
    out = tmp_path / "r" / "report.json"
    argv = [tiny["pipe"].path, "--out", str(out), "--judge", str(tiny["tmp"] / "judge"), "--steps", "2"]
    argv += ["--guidance", "1", "3", "--n-per-prompt", "1", "--negative-n", "1", "--negative-steps", "2"]
    assert main([*argv, "--n-real", "1", "--device", "cpu", "--guidance-interval", "200", "999"]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["guidances"] == [1.0, 3.0] and len(report["sweep"]["settings"]) == 2
    assert report["config"]["guidance_interval"] == [200, 999]
    assert all(r["guidance_interval"] == [200, 999] for r in report["sweep"]["settings"])
    assert report["clip"]["clip_model"].startswith("local-dir:")
    assert report["checks"]["colour_accuracy_ge_0.95"] is None  # no 20-step setting was run
    assert main([str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_cli_negative_n_zero_skips_the_negative_check(tiny, tmp_path):
    out = tmp_path / "report.json"
    argv = [tiny["pipe"].path, "--out", str(out), "--judge", str(tiny["tmp"] / "judge"), "--steps", "2"]
    argv += ["--guidance", "1", "3", "--n-per-prompt", "1", "--n-real", "1", "--negative-n", "0", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["negative"]["skipped"] == "negative_n = 0" and report["negative"]["colours"] == {}
    assert report["checks"]["negative_halves_colour"] is None  # not measured, so neither passed nor failed


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--negative-n", "-1"], "negative_n = -1"),
        (["--n-per-prompt", "0"], "n_per_prompt = 0"),
        (["--steps", "20", "0"], "steps = 0"),
        (["--guidance", "0"], "guidance = 0"),
        (["--n-real", "0"], "n_real = 0"),
        (["--negative-guidance", "0"], "negative_guidance = 0"),
        (["--guidance-interval", "900", "100"], "guidance_interval = [900, 100]"),
        (["--guidance-interval", "1000", "5000"], "guidance_interval = [1000, 5000]"),
        (["--steps", "20", "2000"], "steps = 2000"),
        (["--negative-steps", "1001"], "negative_steps = 1001"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line_before_loading(tmp_path, capsys, flags, named):
    # the model folder does not exist: the settings are checked first, so the error names them, not the folder
    assert main([str(tmp_path / "no-model"), "--out", str(tmp_path / "r.json"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: evaluation settings out of range") and named in err and "\n" not in err
    with pytest.raises(ValueError, match="out of range"):
        LdmEvalConfig(n_per_prompt=0)


def test_cli_refuses_a_bad_out_or_threads_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")  # a file where a folder of --out or --grids would go
    for flags, named in (
        (["--out", str(tmp_path)], "is a directory"),
        (["--threads", "-1"], "--threads must be"),
        (["--out", str(tmp_path / "afile" / "r.json")], "in the way"),
        (["--grids", str(tmp_path / "afile" / "g")], "--grids"),
    ):
        argv = [str(tmp_path / "no-model"), *flags] + ([] if "--out" in flags else ["--out", str(tmp_path / "r")])
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err


def test_default_clip_is_not_a_tower_tuned_with_the_unet(tmp_path):
    from types import SimpleNamespace

    plain = SimpleNamespace(path=str(tmp_path / "m"), index={"text_encoder_info": {"tuned_with_unet": False}})
    assert default_clip(plain) == str(tmp_path / "m" / "text_encoder")
    (tmp_path / "clip").mkdir()
    info = {"tuned_with_unet": True, "source": str(tmp_path / "clip")}
    tuned = SimpleNamespace(path=str(tmp_path / "m"), index={"text_encoder_info": info})
    assert default_clip(tuned) == str(tmp_path / "clip")  # the CLIP it was copied from
    info["source"] = str(tmp_path / "gone")
    with pytest.raises(ValueError, match="tuned with the U-Net.*give --clip"):
        default_clip(tuned)
