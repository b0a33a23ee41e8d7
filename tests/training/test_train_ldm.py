"""The latent diffusion loop: exact resume (model, EMA, optimizer), text encoded in the loop, the data map.

The trainers' command lines and one-line refusals are in test_trainer_cli.py.
"""

import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.latents import write_empty_embedding
from pipeline.manifest import build_manifest, write_manifest
from pipeline.shards import ShardWriter
from pipeline.stats import StageStats
from tests.conftest import in_netns
from training.latent_data import inspect_latents, latent_map
from training.models import create_clip, export_open_clip, model_config
from training.models.pipeline import load_pipeline
from training.models.text import load_text_encoder
from training.models.vae import build_vae, save_vae
from training.sample import generate
from training.train_ldm import LdmTrainConfig, ema_update, parse_args, train

torch.set_num_threads(1)

COLOURS = {"red": (1.5, -1.0, -1.0), "green": (-1.0, 1.5, -1.0), "blue": (-1.0, -1.0, 1.5)}
SHAPES = ("square", "ring", "bar")


def shape_mask(shape: str) -> np.ndarray:
    """An 8x8 mask per shape word, so the latents depend on the caption in a learnable way."""
    m = np.zeros((8, 8), np.float32)
    if shape == "square":
        m[2:6, 2:6] = 1
    elif shape == "ring":
        m[1:7, 1:7] = 1
        m[3:5, 3:5] = 0
    else:
        m[:, 3:5] = 1
    return m


def write_latents(dst, n, encoder, per_shard=32, store_text=True, logvar=False, seed=0):
    """A latent dataset like pipeline/latents.py writes: latents from the caption, text embeddings, manifest."""
    rng = np.random.default_rng(seed)
    captions = [f"a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)}" for _ in range(n)]
    embs = encoder.encode(captions).numpy().astype(np.float16)
    for index, start in enumerate(range(0, n, per_shard)):
        stats = StageStats()
        with ShardWriter(str(dst), index) as w:
            for i in range(start, min(n, start + per_shard)):
                _, colour, shape = captions[i].split()
                mask = shape_mask(shape)
                lat = np.stack([c * mask for c in COLOURS[colour]] + [mask - 0.5]) + 0.05 * rng.standard_normal(
                    (4, 8, 8)
                )
                sample = {"__key__": f"k{i:06d}", "latent.npy": lat.astype(np.float16), "txt": captions[i]}
                if store_text:
                    sample["text_emb.npy"] = embs[i]
                if logvar:
                    sample["logvar.npy"] = np.full((4, 8, 8), -6.0, np.float16)
                w.write(sample)
                stats.seen += 1
                stats.kept += 1
            w.publish(stats)
    te = {**encoder.provenance, "context_length": encoder.context_length, "width": encoder.width}
    config = {"scaling_factor": 1.0, "vae": {"ref": None, "scaling_factor": 1.0}, "text_encoder": te}
    write_manifest(str(dst), build_manifest(str(dst), "encode", config))
    write_empty_embedding(str(dst), encoder.empty())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    clip_dir = root / "clip"
    torch.manual_seed(0)
    export_open_clip(create_clip("micro"), model_config("micro"), clip_dir)  # L=16, D=32
    encoder = load_text_encoder(str(clip_dir), device="cpu")
    write_latents(root / "lat", 96, encoder)
    write_latents(root / "lat_captions", 96, encoder, store_text=False)
    return {"root": root, "clip": clip_dir, "encoder": encoder}


def base_cfg(data, out, **kw) -> LdmTrainConfig:
    cfg = LdmTrainConfig(
        data=str(data),
        out=str(out),
        steps=6,
        batch_size=8,
        lr=2e-3,
        warmup=2,
        workers=2,
        shuffle_buffer=16,
        log_every=1,
        save_every=0,
        threads=1,
        progress=False,
    )
    return replace(cfg, **kw)


def test_exact_resume_matches_uninterrupted_run(env, tmp_path):
    data = env["root"] / "lat"
    full = train(base_cfg(data, tmp_path / "full"))
    first = train(base_cfg(data, tmp_path / "cut", stop_after=3))  # "killed" after the step-3 checkpoint
    assert first["step"] == 3
    resumed = train(base_cfg(data, tmp_path / "cut"))
    assert resumed["step"] == 6 and full["step"] == 6
    ck = {d: tmp_path / d / "checkpoints" / "step_00000006" for d in ("full", "cut")}
    for name in ("model.safetensors", "optimizer.safetensors"):  # U-Net + EMA weights; Adam moments and steps
        a, b = load_file(str(ck["full"] / name)), load_file(str(ck["cut"] / name))
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    model = load_file(str(ck["full"] / "model.safetensors"))
    mid = load_file(str(tmp_path / "cut" / "checkpoints" / "step_00000003" / "model.safetensors"))
    ema_keys = [k for k in model if k.startswith("ema.")]
    assert ema_keys and len(ema_keys) * 2 == len(model)
    assert any(not torch.equal(model[k], mid[k]) for k in ema_keys)  # the EMA moved in the last 3 steps
    assert any(not torch.equal(model[k], model["unet." + k[4:]]) for k in ema_keys)  # and is not the raw weights
    # the exported U-Net is the EMA, identical in both runs
    a = load_file(str(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], model["ema." + k].contiguous()), k
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in full["train"]]
    row = full["train"][-1]
    assert {"samples_per_s", "data_wait", "lr"} <= row.keys() and 0 <= row["data_wait"] < 1
    assert any(k.startswith("loss_t") for k in row)


def test_loss_decreases(env, tmp_path):
    kw = {"steps": 20, "batch_size": 16, "workers": 0, "log_every": 10, "cond_dropout": 0.0}
    losses = [r["loss"] for r in train(base_cfg(env["root"] / "lat", tmp_path / "run", **kw))["train"]]
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_diverging_run_stops_before_saving_or_exporting_diverged_weights(env, tmp_path):
    out = tmp_path / "run"  # one AdamW step at lr 1e30 makes every weight ~1e30: the next forward pass overflows
    with pytest.raises(ValueError, match=r"^step 1: the loss became NaN or infinite after step 0; nothing from"):
        train(base_cfg(env["root"] / "lat", out, lr=1e30, warmup=1, clip_grad=0, save_every=1))
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # step 1's update diverged
    assert not (out / "unet").exists() and not (out / "model_index.json").exists()


def test_text_encoded_in_the_loop_matches_stored_embeddings(env, tmp_path):
    kw = {"steps": 3, "workers": 0, "log_every": 1, "cond_dropout": 0.3}
    stored = [r["loss"] for r in train(base_cfg(env["root"] / "lat", tmp_path / "stored", **kw))["train"]]
    # captions only: the frozen encoder (named by the manifest) runs in the loop on the same batches
    looped = train(base_cfg(env["root"] / "lat_captions", tmp_path / "looped", **kw))
    assert looped["step"] == 3
    # the same batches: only the fp16 rounding of the stored embeddings (~5e-4 of each value) tells them apart, which
    # moves the 3-step losses by up to 1.5e-5 relative; no caption dropout instead moves them by 7e-4 to 1.4e-2
    assert [r["loss"] for r in looped["train"]] == pytest.approx(stored, rel=1e-4)
    config = json.loads((tmp_path / "looped" / "unet" / "config.json").read_text())
    assert config["cross_attention_dim"] == 32 and config["sample_size"] == 8


def test_another_text_encoder_than_the_latents_is_refused_or_run_in_the_loop(env, tmp_path):
    other = tmp_path / "other_clip"
    torch.manual_seed(7)
    export_open_clip(create_clip("micro"), model_config("micro"), other)  # same shape, other weights
    data = env["root"] / "lat"
    kw = {"steps": 2, "workers": 0, "log_every": 1}
    # the stored embeddings come from env["clip"]: pairing the U-Net with another encoder would be silent nonsense
    with pytest.raises(ValueError, match="differs from the dataset's.*--text-in-loop"):
        train(base_cfg(data, tmp_path / "refused", text_encoder=str(other), **kw))
    with pytest.raises(ValueError, match="needs --text-encoder"):
        train(base_cfg(data, tmp_path / "none", text_in_loop=True, **kw))
    # the same encoder as the stored embeddings is accepted
    assert train(base_cfg(data, tmp_path / "same", text_encoder=str(env["clip"]), **kw))["step"] == 2
    # --text-in-loop encodes the captions with the named encoder, and the pipeline records its empty embedding
    save_vae(build_vae("tiny"), tmp_path / "vae")  # with a VAE the run exports a whole pipeline folder
    looped = train(
        base_cfg(
            data, tmp_path / "looped", text_encoder=str(other), text_in_loop=True, vae=str(tmp_path / "vae"), **kw
        )
    )
    assert looped["step"] == 2 and looped["exported"] == "pipeline"
    stored = train(base_cfg(data, tmp_path / "stored", **kw))
    assert looped["train"][0]["loss"] != stored["train"][0]["loss"]  # other conditioning, same batches and noise
    encoder = load_text_encoder(str(other), device="cpu")
    empty = np.load(tmp_path / "looped" / "empty_text_emb.npy")
    assert np.allclose(empty, encoder.empty().numpy(), atol=1e-6)
    assert parse_args([str(data), "--out", "o", "--text-in-loop", "--text-encoder", "x"]).text_in_loop is True
    # captions only: any encoder may run on them (nothing stored to disagree with); a resume must keep it
    captions = env["root"] / "lat_captions"
    assert train(base_cfg(captions, tmp_path / "cap", text_encoder=str(other), **kw))["step"] == 2
    with pytest.raises(ValueError, match="another text encoder"):
        train(base_cfg(captions, tmp_path / "cap", text_encoder=str(env["clip"]), **{**kw, "steps": 3}))


def test_gradient_accumulation_matches_the_larger_batch(env, tmp_path):
    # one loader stream without shuffling: micro-batches 8 + 8 hold the samples of one batch of 16, with the same
    # per-sample noise and timesteps, so the two runs differ only in float summation order
    kw = {"steps": 3, "workers": 0, "shuffle_buffer": 0, "log_every": 1, "min_snr_gamma": 5.0}
    big = train(base_cfg(env["root"] / "lat", tmp_path / "big", batch_size=16, **kw))
    acc = train(base_cfg(env["root"] / "lat", tmp_path / "acc", batch_size=8, grad_accum=2, **kw))
    assert [r["loss"] for r in acc["train"]] == pytest.approx([r["loss"] for r in big["train"]], rel=1e-5)
    a, b = (
        load_file(str(tmp_path / d / "checkpoints" / "step_00000003" / "model.safetensors")) for d in ("big", "acc")
    )
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert acc["train"][-1]["samples_per_s"] > 0


def test_pipeline_folder_and_image_grids(env, tmp_path):
    vae = build_vae("tiny")  # 32 px images <-> 8x8x4 latents
    save_vae(vae, tmp_path / "vae")
    prompts = ("a red square", "a blue bar")
    out = tmp_path / "run"
    cfg = base_cfg(
        env["root"] / "lat", out, steps=2, workers=0, sample_every=1, sample_prompts=prompts, sample_steps=2
    )
    result = train(replace(cfg, vae=str(tmp_path / "vae")))
    assert result["exported"] == "pipeline" and [s["step"] for s in result["samples"]] == [1, 2]
    with Image.open(out / "samples" / "step_00000002.png") as im:
        assert json.loads(im.text["prompts"]) == list(prompts) and im.text["steps"] == "2"
        assert im.size[0] > 2 * 32
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    pipe = load_pipeline(out)
    ema = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ema["ema." + k]), k
    assert pipe.resolution == 32 and pipe.prediction_type == "epsilon"
    assert torch.equal(pipe.empty_emb, env["encoder"].empty().half().float())  # the dataset's empty embedding
    index = json.loads((out / "model_index.json").read_text())
    assert index["lineage"]["step"] == 2 and index["lineage"]["train_config"]["steps"] == 2
    images = generate(pipe, list(prompts), steps=2, guidance=7.5, seed=0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd: str) -> None:
    """``args`` in a fresh process, on loopback only (see ``in_netns``); fails the test on a non-zero exit."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": cwd}
    proc = subprocess.run(in_netns(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # three processes importing torch, diffusers and open_clip: ~20 s on a quiet 2-core machine
def test_text_tower_tuned_with_the_unet(env, tmp_path):
    data = env["root"] / "lat"
    save_vae(build_vae("tiny"), tmp_path / "vae")
    kw = {"steps": 6, "workers": 0, "log_every": 1, "cond_dropout": 0.3, "vae": str(tmp_path / "vae")}
    frozen = train(base_cfg(data, tmp_path / "frozen", text_in_loop=True, text_encoder=str(env["clip"]), **kw))
    # the tower to tune is the one the latent manifest names (or --text-encoder)
    full = train(base_cfg(data, tmp_path / "full", train_text_encoder=True, **kw))
    # before the first update the tuned tower is the frozen one, and a dropped caption is the empty prompt "" in
    # both runs (swapped-in embedding there, the tower's own encoding of "" here): the same first loss
    assert full["train"][0]["loss"] == pytest.approx(frozen["train"][0]["loss"], rel=1e-5)
    assert full["train"][-1]["loss"] != pytest.approx(frozen["train"][-1]["loss"], rel=1e-4)

    # exact resume: U-Net, tower and both EMAs
    cut = train(base_cfg(data, tmp_path / "cut", train_text_encoder=True, stop_after=3, **kw))
    assert cut["step"] == 3
    with pytest.raises(ValueError, match="trained with another text encoder: start over"):  # its optimizer differs
        train(base_cfg(data, tmp_path / "cut", train_text_encoder=True, train_text_embeddings=True, **kw))
    resumed = train(base_cfg(data, tmp_path / "cut", train_text_encoder=True, **kw))
    assert resumed["step"] == 6
    ckpts = [tmp_path / d / "checkpoints" / "step_00000006" / "model.safetensors" for d in ("full", "cut")]
    a, b = (load_file(str(c)) for c in ckpts)
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"unet", "ema", "text", "ema_text"}
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the pipeline folder carries the tuned tower's EMA: changed token states; the pooled projection untouched,
    # and the token embedding table too unless --train-text-embeddings
    source = load_file(str(env["clip"] / "open_clip_model.safetensors"))
    tuned = load_file(str(tmp_path / "full" / "text_encoder" / "open_clip_model.safetensors"))
    assert source.keys() == tuned.keys()
    changed = {k.split(".")[0] for k in source if not torch.equal(source[k], tuned[k])}
    assert changed == {"positional_embedding", "transformer", "ln_final"}
    assert all(torch.equal(tuned[k], a["ema_text." + k]) for k in tuned if "ema_text." + k in a)
    index = json.loads((tmp_path / "full" / "model_index.json").read_text())
    assert index["text_encoder_info"]["tuned_with_unet"] is True
    pipe = load_pipeline(tmp_path / "full")
    assert torch.allclose(pipe.empty_emb.cpu(), pipe.text_encoder.empty().cpu(), atol=1e-6)
    assert not torch.allclose(pipe.empty_emb.cpu(), env["encoder"].empty().cpu(), atol=1e-4)
    assert generate(pipe, ["a red square"], steps=2, guidance=3.0, seed=0).shape[0] == 1
    frozen_index = json.loads((tmp_path / "frozen" / "model_index.json").read_text())
    assert frozen_index["text_encoder_info"]["tuned_with_unet"] is False
    assert parse_args([str(data), "--out", "o", "--train-text-encoder", "--text-encoder", "x"]).train_text_encoder

    # --text-lr-scale: Adam's first step moves each weight by about its learning rate, so the tower's largest step
    # scales with it, while the U-Net's first step (taken before the tower changed) is the same
    one = {"steps": 1, "warmup": 1, "workers": 0, "cond_dropout": 0.0, "train_text_encoder": True}
    w, moved = {}, {}
    for scale, table in ((1.0, False), (0.25, False), (1.0, True)):
        run_dir = tmp_path / f"s{scale}{table}"
        train(base_cfg(data, run_dir, text_lr_scale=scale, train_text_embeddings=table, **one))
        w[scale, table] = load_file(str(run_dir / "checkpoints" / "step_00000001" / "model.safetensors"))
        moved[scale, table] = {
            part: float((w[scale, table][f"text.{part}"] - source[part]).abs().max())
            for part in ("positional_embedding", "token_embedding.weight")
        }
    pos = {k: m["positional_embedding"] for k, m in moved.items()}
    assert pos[1.0, False] > 1e-3 and pos[0.25, False] == pytest.approx(0.25 * pos[1.0, False], rel=0.05)
    assert all(torch.equal(w[1.0, False][k], w[0.25, False][k]) for k in w[1.0, False] if k.startswith("unet."))
    # the token table moves only when asked (and then at the tower's learning rate too)
    assert moved[1.0, False]["token_embedding.weight"] == 0.0 == moved[0.25, False]["token_embedding.weight"]
    assert moved[1.0, True]["token_embedding.weight"] > 1e-3
    with pytest.raises(ValueError, match="text_lr_scale must be > 0"):
        base_cfg(data, tmp_path / "bad", text_lr_scale=0.0)


@pytest.mark.parametrize("tuned", [False, True], ids=["unet", "unet+text"])
def test_two_gloo_processes_match_one(env, tmp_path, tuned):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # split="sample" without a shuffle buffer: a global batch holds the same samples on 1 rank or 2, and each
    # sample's noise, timestep and dropout come from its own key, so both runs see the same global batch
    common = ["--steps", "3", "--warmup", "1", "--workers", "0", "--split", "sample", "--shuffle-buffer", "0"]
    common += ["--threads", "1", "--no-progress", "--log-every", "1", "--min-snr-gamma", "5", "--cond-dropout", "0.3"]
    if tuned:  # the tower's gradients are averaged over the ranks too
        common += ["--train-text-encoder", "--text-encoder", str(env["clip"])]
    trainer = ["-m", "training.train_ldm", str(env["root"] / "lat")]
    run([sys.executable, *trainer, "--out", str(tmp_path / "one"), "--batch-size", "16", *common], repo)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    run([*torchrun, *trainer, "--out", str(tmp_path / "two"), "--batch-size", "8", *common], repo)
    one, two = (
        load_file(str(tmp_path / d / "checkpoints" / "step_00000003" / "model.safetensors")) for d in ("one", "two")
    )
    for k in one:  # U-Net and EMA; Adam's first steps amplify float summation-order noise: small atol
        # (more for the tower's near-zero-gradient biases; an unaveraged gradient would be off by ~lr = 2e-3)
        atol = 1e-4 if k.startswith(("text.", "ema_text.")) else 1e-5
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=atol), (k, float((one[k] - two[k]).abs().max()))
    if tuned:  # and the tower did learn
        source = load_file(str(env["clip"] / "open_clip_model.safetensors"))
        assert not torch.allclose(one["text.positional_embedding"], source["positional_embedding"], atol=1e-4)
    losses = [
        [r["loss"] for r in json.loads((tmp_path / d / "metrics.json").read_text())["train"]] for d in ("one", "two")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(set(losses[0])) == 3
    state = json.loads((tmp_path / "two" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2


def raw(sample: dict) -> dict:
    out = {"__key__": "k"}
    for ext, value in sample.items():
        buf = io.BytesIO()
        np.save(buf, value)
        out[ext] = buf.getvalue()
    return out


def test_latent_map_draws_posterior_flip_noise_and_timesteps():
    mean = np.zeros((4, 8, 8), np.float16)
    sample = raw(
        {
            "latent.npy": mean,
            "logvar.npy": np.full((4, 8, 8), np.log(0.25), np.float16),  # posterior std 0.5 before scaling
            "latent_flip.npy": np.full((4, 8, 8), 3.0, np.float16),
            "text_emb.npy": np.ones((16, 32), np.float16),
        }
    )
    draws = [latent_map(sample, random.Random(i), 2.0, True, 0.0, 0.5) for i in range(400)]
    flipped = [d["latent"].mean() > 1.5 for d in draws]
    assert 0.4 < np.mean(flipped) < 0.6  # the flipped latent with p = 0.5
    plain = torch.stack([d["latent"] for d, f in zip(draws, flipped, strict=True) if not f])
    assert plain.std().item() == pytest.approx(2.0 * 0.5, rel=0.05)  # mean + scaling_factor * exp(logvar / 2) * eps
    flips = torch.stack([d["latent"] for d, f in zip(draws, flipped, strict=True) if f])
    assert torch.equal(flips, torch.full_like(flips, 3.0))  # no logvar_flip stored: the flipped mean as is
    noise = torch.stack([d["noise"] for d in draws])
    assert abs(noise.mean().item()) < 0.02 and noise.std().item() == pytest.approx(1.0, rel=0.03)
    t = torch.stack([d["timestep"] for d in draws])
    assert t.min() >= 0 and t.max() < 1000 and t.float().std() > 200
    mid = torch.stack(
        [
            latent_map(sample, random.Random(i), 2.0, True, 0.0, 0.5, timesteps=("logit_normal", 0.0, 0.5))["timestep"]
            for i in range(400)
        ]
    )
    inner = ((mid >= 250) & (mid < 750)).float().mean()  # sigmoid(N(0, 0.5)): 97% in the middle half
    assert inner > 0.9 and (mid < 250).float().mean() < 0.05
    assert draws[0]["text_emb"].dtype == torch.float32 and draws[0]["text_emb"].shape == (16, 32)
    again = latent_map(sample, random.Random(0), 2.0, True, 0.0, 0.5)  # the same seed gives the same draw
    assert all(torch.equal(again[k], draws[0][k]) for k in ("latent", "noise", "timestep", "drop_u"))
    # without a flipped latent the flag is ignored; captions pass through when no text embeddings are stored
    no_flip = raw({"latent.npy": mean}) | {"txt": b"a red square"}
    d = latent_map(no_flip, random.Random(1), None, False, 0.1, 1.0)
    assert d["caption"] == "a red square" and torch.equal(d["latent"], torch.zeros(4, 8, 8))


def test_inspect_latents_and_setup_errors(env, tmp_path):
    info = inspect_latents(str(env["root"] / "lat"))
    assert info.latent_shape == (4, 8, 8) and info.text_in_shards and info.text_width == 32
    assert info.scaling_factor == 1.0 and not info.has_logvar
    assert not inspect_latents(str(env["root"] / "lat_captions")).text_in_shards
    # an empty or corrupt first shard is passed over; no readable sample at all is one line
    import shutil

    shutil.copytree(env["root"] / "lat", tmp_path / "lat2")
    first = sorted((tmp_path / "lat2").glob("*.tar"))[0]
    first.write_bytes(b"\0garbage" * 64)
    assert inspect_latents(str(tmp_path / "lat2")).latent_shape == (4, 8, 8)
    for tar in (tmp_path / "lat2").glob("*.tar"):
        tar.write_bytes(b"")
    with pytest.raises(ValueError, match="no readable sample in") as err:
        inspect_latents(str(tmp_path / "lat2"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown U-Net config"):
        train(base_cfg(env["root"] / "lat", tmp_path / "bad", config="no-such"))


def test_ema_update_is_the_exponential_average():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * b + 0.1 * m)
    ema_update(ema, model, 0.0)
    assert all(torch.equal(e, m) for e, m in zip(ema.parameters(), model.parameters(), strict=True))


def test_inputs_that_cannot_train_are_refused_before_the_first_step(env, tmp_path):
    from types import SimpleNamespace

    from training.latent_data import empty_embedding
    from training.models.unet import unet_config

    data = env["root"] / "lat"
    wide = SimpleNamespace(empty=lambda: torch.zeros(16, 64))  # a tower of another width than the stored (16, 32)
    with pytest.raises(ValueError, match=r"\(16, 64\).*\(16, 32\).*another encoder"):
        empty_embedding(inspect_latents(str(data)), wide, None)
    eight = {k: v for k, v in unet_config("tiny", 32, 8).items() if not k.startswith("_")}
    (tmp_path / "unet8.json").write_text(json.dumps({**eight, "in_channels": 8, "out_channels": 8}))
    with pytest.raises(ValueError, match="takes 8 latent channels.*the latents have 4"):
        train(base_cfg(data, tmp_path / "c8", config=str(tmp_path / "unet8.json")))
    with pytest.raises(ValueError, match="cannot load"):  # found now, not after the last step
        train(base_cfg(data, tmp_path / "novae", vae=str(tmp_path / "no-such-vae"), text_encoder=str(env["clip"])))
    assert not (tmp_path / "novae" / "checkpoints").exists()
    with pytest.raises(ValueError, match="log_every = -1"):
        base_cfg(data, tmp_path / "x", log_every=-1)


def test_a_resume_with_another_target_is_refused_and_a_relaunch_past_stop_after_stops(env, tmp_path):
    data = env["root"] / "lat"
    kw = {"steps": 6, "workers": 0}
    first = train(base_cfg(data, tmp_path / "run", stop_after=3, **kw))
    again = train(base_cfg(data, tmp_path / "run", stop_after=3, **kw))  # nothing left before --stop-after
    assert first["step"] == again["step"] == 3 and len(again["train"]) == len(first["train"])
    with pytest.raises(ValueError, match="another prediction.*--resume none"):
        train(base_cfg(data, tmp_path / "run", prediction="v_prediction", **kw))
    # naming the encoder that made the stored embeddings (by any spelling) resumes: the U-Net reads the same states
    named = train(base_cfg(data, tmp_path / "run", stop_after=4, text_encoder=str(env["clip"]) + "/", **kw))
    assert named["step"] == 4
    with pytest.raises(ValueError, match="another text encoder"):  # but encoding the captions in the loop is other
        train(base_cfg(data, tmp_path / "run", text_encoder=str(env["clip"]), text_in_loop=True, **kw))


def test_a_sample_of_another_shape_is_a_counted_skip_and_a_bad_caption_does_not_refuse_the_set(env, tmp_path):
    src = env["root"] / "lat"
    dst = tmp_path / "odd"
    import shutil

    shutil.copytree(src, dst)
    enc = env["encoder"]
    with ShardWriter(str(dst), 50) as w:  # an extra shard: a latent of another size, then a good one
        emb = enc.encode(["a red bar"])[0].numpy().astype(np.float16)
        w.write(
            {"__key__": "z000000", "latent.npy": np.zeros((4, 16, 16), np.float16), "txt": "x", "text_emb.npy": emb}
        )
        w.write({"__key__": "z000001", "latent.npy": np.zeros((4, 8, 8), np.float16), "txt": "x", "text_emb.npy": emb})
        w.publish(StageStats(seen=2, kept=2))
    from pipeline.shards import write_sizes

    write_sizes(str(dst))
    write_manifest(
        str(dst), build_manifest(str(dst), "encode", json.loads((src / "manifest.json").read_text())["config"])
    )
    got = train(base_cfg(dst, tmp_path / "run", steps=12, workers=0, shuffle_buffer=0))  # one epoch: 97 usable
    assert got["step"] == 12 and got["data_errors"].get("decode_error") == 1
    bad = tmp_path / "badcap"
    with ShardWriter(str(bad), 0) as w:
        w.write({"__key__": "a000000", "latent.npy": np.zeros((4, 8, 8), np.float16), "txt": b"\xff\xfe bad"})
        w.publish(StageStats(seen=1, kept=1))
    assert inspect_latents(str(bad)).latent_shape == (4, 8, 8)  # the caption is the loop's concern


def test_a_recorded_text_encoder_that_is_gone_is_refused_before_training(env, tmp_path):
    data = tmp_path / "lat"  # stored embeddings: the tower is only needed for the pipeline folder
    shutil.copytree(env["root"] / "lat", data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["config"]["text_encoder"]["model"] = str(tmp_path / "gone")
    (data / "manifest.json").write_text(json.dumps(manifest))
    save_vae(build_vae("tiny"), tmp_path / "vae")
    with pytest.raises(ValueError, match="cannot load CLIP model '.*gone'"):
        train(base_cfg(data, tmp_path / "run", vae=str(tmp_path / "vae")))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step
