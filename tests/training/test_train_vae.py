"""The VAE loop: exact resume after a kill, the diffusers folder and scaling factor it writes, PSNR floor, flags."""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from pipeline.shards import iter_samples, shard_urls
from training.models.vae import build_vae, heldout_psnr
from training.synthetic import write_demo_shards
from training.train_vae import VaeTrainConfig, _Autoencode, image_batches, image_tensor, parse_args, train

torch.set_num_threads(1)

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Held-out PSNR floor (dB) after 60 steps of 8 images (lr 5e-3) on these 32 px demo shards. Measured with seeds
# 0-3: untrained 7.9-9.3 dB, trained 12.8-14.5 dB (seed 0, the one tested: untrained 9.0, trained 12.8).
PSNR_FLOOR = 11.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_demo_shards(str(root / "train"), 160, seed=0, size=32, per_shard=40)
    write_demo_shards(str(root / "eval"), 48, seed=1, size=32, per_shard=48)
    return root


def base_cfg(data, out, **kw) -> VaeTrainConfig:
    cfg = VaeTrainConfig(
        data=str(data / "train"),
        out=str(out),
        steps=6,
        batch_size=8,
        lr=5e-3,
        warmup_steps=2,
        workers=2,
        shuffle_buffer=20,
        log_every=1,
        save_every=0,
        sample_every=3,
        sample_images=4,
        scale_samples=24,
        threads=1,
        progress=False,
    )
    return replace(cfg, **kw)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, train(base_cfg(data, out))


def test_exact_resume_matches_uninterrupted_run(data, full_run, tmp_path):
    full_out, full = full_run
    first = train(base_cfg(data, tmp_path / "cut", stop_after=3))  # "killed" after the step-3 checkpoint
    assert first["step"] == 3
    resumed = train(base_cfg(data, tmp_path / "cut"))
    assert resumed["step"] == 6 and full["step"] == 6
    a = load_file(str(full_out / WEIGHTS))
    b = load_file(str(tmp_path / "cut" / WEIGHTS))
    mid = load_file(str(tmp_path / "cut" / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert a.keys() == b.keys() == mid.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # the last 3 steps did change the weights
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in full["train"]]
    assert resumed["scaling_factor"] == full["scaling_factor"]


def test_run_writes_a_diffusers_folder_with_the_data_scaling_factor(data, full_run):
    out, result = full_run
    vae = AutoencoderKL.from_pretrained(str(out)).eval()
    assert vae.config.scaling_factor == pytest.approx(result["scaling_factor"], rel=1e-6)
    # independently: 1 / std of the posterior means of the first 24 training images in shard order
    pixels = []
    for url in sorted(shard_urls(str(data / "train"))):
        for sample in iter_samples(url, decode=False):
            pixels.append(np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
    x = torch.from_numpy(np.stack(pixels[:24])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean
    assert latents.shape == (24, 4, 8, 8)
    assert vae.config.scaling_factor == pytest.approx(1 / float(latents.double().std()), rel=1e-4)
    assert vae.config.scaling_factor != pytest.approx(1.0)  # the placeholder of the tiny config was replaced
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["psnr"] is None and metrics["latent_elements"] == 24 * 4 * 8 * 8
    assert VaeTrainConfig.from_json((out / "train_config.json").read_text()) == base_cfg(data, out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    grids = events.Images("reconstructions/top_input_bottom_output")
    assert [g.step for g in grids] == [3, 6] and (grids[0].height, grids[0].width) == (64, 128)
    assert {"train/loss", "train/psnr", "train/kl"} <= set(events.Tags()["scalars"])


def test_short_run_beats_the_psnr_floor_that_an_untrained_vae_fails(data, tmp_path):
    heldout = str(data / "eval")
    torch.manual_seed(0)  # the trainer's initialisation for seed 0
    untrained, n = heldout_psnr(build_vae("tiny"), image_batches(heldout, 32, 48, 48))
    cfg = base_cfg(data, tmp_path / "run", steps=60, warmup_steps=5, workers=0, log_every=60, sample_every=0)
    result = train(replace(cfg, eval_data=heldout, eval_limit=48, scale_samples=16))
    print(f"held-out PSNR: untrained {untrained:.2f} dB, after 60 steps {result['psnr']:.2f} dB")
    assert n == result["psnr_images"] == 48
    assert untrained < PSNR_FLOOR < result["psnr"]


def test_images_are_resized_center_cropped_and_scaled_to_minus_one_one():
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 15, 30))  # a red band on the left quarter: cropped away
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = image_tensor({"__key__": "k", "png": buf.getvalue()}, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x[0].max() < -0.85 and x[2].min() > 0.85  # no red left, all blue
    with pytest.raises(KeyError):
        image_tensor({"__key__": "k", "txt": b"no image"}, 16)


def test_config_flags_round_trip_and_bad_values_fail(capsys):
    cfg = parse_args(
        ["DATA", "--out", "OUT", "--config", "sd", "--resolution", "256", "--loss", "mse", "--kl-weight", "1e-5"]
        + ["--no-progress", "--storage-options", '{"anon": true}', "--eval-data", "EV"]
    )
    assert (cfg.config, cfg.resolution, cfg.loss, cfg.kl_weight, cfg.progress) == ("sd", 256, "mse", 1e-5, False)
    assert cfg.storage_options == {"anon": True} and cfg.eval_data == "EV"
    assert VaeTrainConfig.from_json(cfg.to_json()) == cfg
    bad_values = (["--loss", "l3"], ["--perceptual-weight", "0.1"], ["--latent-noise", "-0.1"], ["--log-every", "-1"])
    for bad in (*bad_values, ["--sample-images", "0"], ["--eval-limit", "0"], ["--save-every", "-2"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["DATA", "--out", "OUT", *bad])
        err = capsys.readouterr().err.strip().splitlines()  # one line, no usage block
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (bad, err)


def test_latent_noise_perturbs_the_decoder_input_relative_to_the_latent_scale():
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    seen = []
    hook = vae.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        out = {noise: _Autoencode(vae, noise)(images, torch.Generator().manual_seed(7)) for noise in (0.0, 0.5)}
        again, mean, _ = _Autoencode(vae, 0.0)(images, torch.Generator().manual_seed(7))
    hook.remove()
    assert torch.equal(out[0.0][0], again)  # off: the plain posterior sample, as before
    assert (out[0.5][0] - out[0.0][0]).abs().mean() > 1e-3
    plain, noisy, _ = seen
    assert not torch.equal(plain, noisy)
    ratio = float((noisy - plain).std() / mean.std())  # u * 0.5 * N(0, 1), u ~ U(0, 1) per image
    assert 0.02 < ratio < 0.5


def test_a_relaunch_past_stop_after_stops_at_once_and_adds_no_evaluation(data, tmp_path):
    cfg = base_cfg(data, tmp_path / "run", stop_after=3, eval_data=str(data / "eval"), eval_limit=8)
    first = train(cfg)
    again = train(cfg)  # the same command once more: nothing left to do before --stop-after
    assert first["step"] == again["step"] == 3
    assert len(again["train"]) == len(first["train"])
    assert [e["step"] for e in again["eval"]] == [e["step"] for e in first["eval"]] == [3]
    other = train(replace(cfg, eval_limit=16))  # on other images: measured again, not the stored figure
    assert [(e["step"], e["images"], e["eval_limit"]) for e in other["eval"]] == [(3, 8, 8), (3, 16, 16)]
    assert other["psnr"] == other["eval"][-1]["psnr"] and other["psnr_images"] == 16


def test_resuming_a_vae_of_another_architecture_is_refused(data, tmp_path):
    from training.models.vae import vae_config

    train(base_cfg(data, tmp_path / "run", stop_after=2))
    other = dict(vae_config("tiny"), act_fn="gelu")  # the same tensor shapes, another network
    (tmp_path / "gelu.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another architecture.*--resume none"):
        train(base_cfg(data, tmp_path / "run", config=str(tmp_path / "gelu.json")))


def test_data_without_any_image_is_an_error_not_a_hang(data, tmp_path):
    from pipeline.shards import ShardWriter, write_sizes
    from pipeline.stats import StageStats

    root = tmp_path / "noimg"
    with ShardWriter(str(root), 0) as w:
        for i in range(24):
            w.write({"__key__": f"k{i:04d}", "txt": "a red circle", "json": {"i": i}})
            w.add_row({"key": f"k{i:04d}", "status": "success"})
        w.publish(StageStats(seen=24, kept=24))
    write_sizes(str(root))
    cfg = replace(base_cfg(data, tmp_path / "o", eval_data=str(data / "eval"), workers=0), data=str(root))
    with pytest.raises(ValueError, match="no usable sample"):
        train(cfg)


def test_a_diverged_run_stops_with_one_line_before_saving_nan_weights(data, tmp_path):
    with pytest.raises(ValueError, match="the loss is (nan|inf); lower --lr"):
        train(base_cfg(data, tmp_path / "o", lr=1e6, steps=6, sample_every=0))
    assert not list((tmp_path / "o").glob("checkpoints/step_*"))


def test_the_update_that_diverges_is_caught_before_its_checkpoint(data, tmp_path):
    # one AdamW step at lr 1e30 makes every weight ~1e30; that step's own loss was still finite
    with pytest.raises(
        ValueError, match=r"^step 1: the loss became NaN or infinite after step 0; .*--lr \(now 1e\+30\)"
    ):
        train(base_cfg(data, tmp_path / "o", lr=1e30, warmup_steps=1, grad_clip=0, save_every=1, sample_every=0))
    assert not list((tmp_path / "o").glob("checkpoints/step_*"))


def test_bad_held_out_images_are_counted_once_not_per_evaluation(data, tmp_path):
    import shutil

    from pipeline.shards import ShardWriter, write_sizes
    from pipeline.stats import StageStats

    held = tmp_path / "held"
    shutil.copytree(data / "eval", held)
    (held / "manifest.json").unlink()  # read as its done shards, the one added below included
    with ShardWriter(str(held), 7) as w:  # two held-out samples that do not decode
        for i in range(2):
            w.write({"__key__": f"bad{i}", "png": b"not a png", "txt": "x"})
            w.add_row({"key": f"bad{i}", "status": "success"})
        w.publish(StageStats(seen=2, kept=2))
    write_sizes(str(held))
    got = train(base_cfg(data, tmp_path / "o", eval_data=str(held), eval_limit=64, sample_every=2))
    assert len(got["eval"]) == 3 and got["read_errors"] == {"decode_error": 2}  # three evaluations, two bad images
