"""The CLIP loop: exact resume, the open_clip export round trip, config round trip, optimizer groups, schedule."""

import json
import math
from dataclasses import replace

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from training.models import create_clip, get_tokenizer, resolve_model_name
from training.models.clip import CONFIG_DIR
from training.synthetic import write_demo_shards
from training.train_clip import ClipTrainConfig, lr_at, param_groups, parse_args, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_demo_shards(str(root / "train"), 160, seed=0, size=32, per_shard=40, mismatch_rate=0.2)
    write_demo_shards(str(root / "eval"), 60, seed=1, size=32, per_shard=60)
    return root


def base_cfg(data, out, **kw) -> ClipTrainConfig:
    cfg = ClipTrainConfig(
        data=str(data / "train"),
        out=str(out),
        model="micro",
        steps=6,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        workers=2,
        shuffle_buffer=20,
        log_every=1,
        save_every=0,
        threads=1,
        progress=False,
    )
    return replace(cfg, **kw)


def test_exact_resume_matches_uninterrupted_run(data, tmp_path):
    full = train(base_cfg(data, tmp_path / "full"))
    first = train(base_cfg(data, tmp_path / "cut", stop_after=3))  # "killed" after the step-3 checkpoint
    assert first["step"] == 3
    resumed = train(base_cfg(data, tmp_path / "cut"))
    assert resumed["step"] == 6 and full["step"] == 6
    a = load_file(str(tmp_path / "full" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "open_clip_model.safetensors"))
    mid = load_file(str(tmp_path / "cut" / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k
    assert any(not torch.allclose(a[k], mid[k]) for k in a)  # the last 3 steps did change the weights
    # the loss history of the resumed run continues the uninterrupted one
    assert [r["loss"] for r in resumed["train"]] == pytest.approx([r["loss"] for r in full["train"]], rel=1e-5)


def test_output_dir_loads_in_open_clip(data, tmp_path):
    out = tmp_path / "run"
    result = train(base_cfg(data, out, steps=2, workers=0, eval_data=str(data / "eval")))
    ours = create_clip("micro")
    ours.load_state_dict(load_file(str(out / "open_clip_model.safetensors")))
    ours.eval()
    tok = get_tokenizer("micro")
    text = tok(["a red circle", "two shapes: a blue star & a green square"])
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ours.encode_image(image), ours.encode_text(text)
    # by directory (open_clip's local-dir schema) and by name + pretrained file
    m1, _, pre1 = open_clip.create_model_and_transforms(f"local-dir:{out}")
    m2, _, _ = open_clip.create_model_and_transforms(
        resolve_model_name("micro"), pretrained=str(out / "open_clip_model.safetensors")
    )
    for m in (m1, m2):
        m.eval()
        with torch.no_grad():
            assert torch.allclose(m.encode_image(image), want[0], atol=1e-6)
            assert torch.allclose(m.encode_text(text), want[1], atol=1e-6)
    assert pre1.transforms[0].size in (32, [32], (32, 32))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert {"image_to_text_R@5", "zeroshot_colour", "zeroshot_shape"} <= metrics["eval"][-1].keys()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_config_round_trips_and_cli_flags():
    cfg = parse_args(
        [
            "DATA",
            "--out",
            "OUT",
            "--config",
            "tiny",
            "--steps",
            "7",
            "--batch-size",
            "4",
            "--no-progress",
            "--betas",
            "0.8",
            "0.9",
            "--eval-data",
            "EV",
        ]
    )
    assert (cfg.model, cfg.steps, cfg.batch_size, cfg.progress, cfg.betas) == ("tiny", 7, 4, False, (0.8, 0.9))
    assert ClipTrainConfig.from_json(cfg.to_json()) == cfg


def test_weight_decay_exclusions_and_schedule():
    model = create_clip("micro")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" not in decayed and "token_embedding.weight" not in decayed
    assert not any(n.endswith(".bias") or "ln_" in n for n in decayed)
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    cfg = ClipTrainConfig(data="d", out="o", steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_project_configs_build_and_named_architectures_resolve():
    for name in ("tiny", "tiny-vit", "micro"):
        model = create_clip(name)
        assert resolve_model_name(name) == f"altforge-{name}"
        size = open_clip.get_model_config(f"altforge-{name}")["vision_cfg"]["image_size"]
        with torch.no_grad():
            assert model.encode_image(torch.zeros(1, 3, size, size)).shape[-1] > 0
    assert resolve_model_name("ViT-B-32") == "ViT-B-32"
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model_name("no-such-model")


def test_a_resume_with_another_batch_size_restarts_at_an_epoch_instead_of_reusing_offsets(data, tmp_path, capsys):
    train(base_cfg(data, tmp_path / "run", stop_after=3))
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert len(state["data_plan"]) == 16  # the fingerprint of the sample stream the offsets point into
    capsys.readouterr()
    resumed = train(base_cfg(data, tmp_path / "run", batch_size=4))  # same ranks and workers, another stream
    out = capsys.readouterr().out
    assert resumed["step"] == 6
    assert "resumed from" in out and "(data from epoch 1)" in out, out  # the next epoch, not the old offsets


def test_resume_with_patch_dropout_is_bit_identical(data, tmp_path):
    """Dropout draws from the global torch RNG a checkpoint restores; creating the DataLoader iterator must not
    draw from it too (it did, for the workers' base seed), or the resumed run drops other patches."""
    arch = json.loads((CONFIG_DIR / "altforge-micro.json").read_text())
    arch["vision_cfg"]["patch_dropout"] = 0.5
    (tmp_path / "micropd.json").write_text(json.dumps(arch))
    kw = {"model": str(tmp_path / "micropd.json"), "steps": 5, "workers": 0}
    full = train(base_cfg(data, tmp_path / "full", **kw))
    train(base_cfg(data, tmp_path / "cut", stop_after=2, **kw))
    resumed = train(base_cfg(data, tmp_path / "cut", **kw))
    a = load_file(str(tmp_path / "full" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "open_clip_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in full["train"]]


def test_the_export_preprocesses_a_non_square_image_as_training_did(data, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from training.models import make_clip_map

    out = tmp_path / "run"
    train(base_cfg(data, out, steps=1, workers=0))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))  # 80 wide, 48 high
    buf = io.BytesIO()
    img.save(buf, "PNG")
    fed = make_clip_map("micro")({"png": buf.getvalue(), "txt": b"a red circle", "__key__": "k"}, None)["image"]
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    theirs = preprocess(img)
    assert fed.shape == theirs.shape == (3, 32, 32)
    assert torch.allclose(fed, theirs, atol=1e-5), float((fed - theirs).abs().max())  # a centre crop differs


def test_a_failing_final_evaluation_keeps_the_final_checkpoint_and_export(data, tmp_path, monkeypatch):
    import training.train_clip as tc

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(tc, "evaluate_clip", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(base_cfg(data, out, steps=2, workers=0, eval_data=str(data / "eval")))
    assert (out / "checkpoints" / "step_00000002" / "state.json").is_file()
    assert (out / "open_clip_model.safetensors").is_file()


def test_bad_settings_are_one_line_cli_errors(capsys):
    for flags, message in (
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--accum-steps", "0"], "accum_steps must be >= 1"),
        (["--log-every", "-1"], "log_every must be >= 0"),
        (["--storage-options", '{"endpoint_url": '], "storage_options is not JSON"),
        (["--storage-options", "[1]"], "storage_options must be a JSON object"),
    ):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["DATA", "--out", "OUT", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert parse_args(["DATA", "--out", "OUT", "--device", "cuda:1"]).device == "cuda:1"


def test_log_every_zero_logs_at_the_end_only(data, tmp_path):
    result = train(base_cfg(data, tmp_path / "run", steps=3, workers=0, log_every=0))
    assert [r["step"] for r in result["train"]] == [3]


def test_resuming_another_architecture_is_a_one_line_error(data, tmp_path, capsys):
    from training.train_clip import main

    train(base_cfg(data, tmp_path / "run", steps=1, workers=0))
    capsys.readouterr()
    args = [str(data / "train"), "--out", str(tmp_path / "run"), "--config", "tiny", "--workers", "0"]
    assert main([*args, "--threads", "1", "--batch-size", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--resume none" in err, err


def test_a_relaunch_past_stop_after_stops_at_once(data, tmp_path):
    first = train(base_cfg(data, tmp_path / "run", steps=6, workers=0, stop_after=2))
    again = train(base_cfg(data, tmp_path / "run", steps=6, workers=0, stop_after=2))
    assert first["step"] == again["step"] == 2
    assert len(again["train"]) == len(first["train"])  # no step was trained
    later = train(base_cfg(data, tmp_path / "run", steps=6, workers=0, stop_after=1))  # already past it
    assert later["step"] == 2


def test_the_clip_trainer_sees_images_as_curation_scores_them():
    """Upright, alpha on white, 16-bit grey scaled: the trainer decoded with a bare convert("RGB") before, so a
    16-bit grey gradient trained as white, a transparent red PNG as red and an EXIF-rotated photo sideways."""
    import io

    import numpy as np
    from PIL import Image

    from training.models.clip import image_of

    def png(im: Image.Image, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG", **kw)
        return buf.getvalue()

    grey16 = Image.fromarray((np.linspace(0, 65535, 64 * 16).reshape(16, 64)).astype(np.uint16))
    assert 100 < np.asarray(image_of({"png": png(grey16)})).mean() < 155  # scaled, not clipped to white

    clear_red = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(image_of({"png": png(clear_red)})).min() == 255  # white, not the hidden red

    wide = Image.new("RGB", (60, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    buf = io.BytesIO()
    wide.save(buf, format="JPEG", exif=exif.tobytes())
    assert image_of({"jpg": buf.getvalue()}).size == (20, 60)
