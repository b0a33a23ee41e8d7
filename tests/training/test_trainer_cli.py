"""The trainers' command lines: flags and a config round trip, settings out of range and missing data refused in one
line, a library error kept with its traceback."""

import os
from dataclasses import replace

import pytest
import torch

from training.train_ldm import LdmTrainConfig, lr_at, parse_args


def test_config_round_trips_and_cli_flags(capsys):
    cfg = parse_args(
        ["DATA", "--out", "OUT", "--config", "sd15", "--steps", "7", "--prediction", "v_prediction"]
        + ["--min-snr-gamma", "5", "--sample-prompts", "a red circle", "a blue star", "--no-progress"]
        + ["--storage-options", '{"anon": true}', "--betas", "0.9", "0.99"]
    )
    assert (cfg.config, cfg.steps, cfg.prediction, cfg.min_snr_gamma) == ("sd15", 7, "v_prediction", 5.0)
    assert cfg.sample_prompts == ("a red circle", "a blue star") and cfg.storage_options == {"anon": True}
    assert LdmTrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="prediction"):
        replace(cfg, prediction="x0")
    for bad in ({"sample_steps": 0}, {"sample_steps": 2000}, {"sample_guidance": float("nan")}):
        with pytest.raises(ValueError, match="sample_steps must be 1..1000"):  # checked before any training
            LdmTrainConfig(data="d", out="o", steps=100, **bad)
    with pytest.raises(SystemExit) as exit_:  # on the command line: one line, without argparse's usage block
        parse_args(["DATA", "--out", "OUT", "--sample-steps", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: sample_steps must be 1..1000"), err
    sched = LdmTrainConfig(data="d", out="o", steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, sched) == pytest.approx(0.1) and lr_at(9, sched) == pytest.approx(1.0)
    assert lr_at(100, sched) == pytest.approx(0.1)


@pytest.mark.parametrize("module", ["training.train_ldm", "training.train_vae", "training.train_clip"])
def test_refused_settings_and_missing_data_are_one_line_errors(module, tmp_path):
    import subprocess
    import sys

    (tmp_path / "a-file").write_text("not a folder")
    for flags, named in (
        (["--device", "bogus"], "unknown device"),
        (["--device", "cpu"], "no shards found"),
        (["--device", "cpu", "--out", str(tmp_path / "a-file")], "a-file: cannot create the run directory"),
    ):
        argv = [sys.executable, "-m", module, str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--steps", "1"]
        r = subprocess.run(argv + flags, capture_output=True, text=True, timeout=300, env={**os.environ})
        err = r.stderr.strip()
        assert r.returncode == 2 and named in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "module, flags, named",
    [
        (
            "training.train_ldm",
            ["--min-snr-gamma", "-0.00001", "--flip-p", "2"],
            ["min_snr_gamma = -1e-05", "flip_p = 2"],
        ),
        ("training.train_ldm", ["--lr", "0.01", "--min-lr", "0.1"], ["min_lr = 0.1 (needs <= lr = 0.01)"]),
        (
            "training.train_ldm",
            ["--timestep-sampling", "logit_normal", "--timestep-std", "0", "--timestep-mean", "inf"],
            ["timestep_std = 0.0", "timestep_mean = inf"],
        ),
        ("training.train_vae", ["--kl-weight", "nan", "--lr", "-1"], ["kl_weight = nan", "lr = -1"]),
        (
            "training.train_clip",
            ["--betas", "0.9", "1.0", "--min-crop-scale", "0"],
            ["betas = (0.9, 1.0)", "min_crop"],
        ),
    ],
)
def test_float_settings_out_of_range_are_one_line_before_anything_loads(module, flags, named, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:  # a negative weighting would have trained as if it were off
        importlib.import_module(module).parse_args(["DATA", "--out", "OUT", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: settings out of range: "), err
    assert all(n in err[0] for n in named), err


def test_only_refusals_are_one_line_a_library_error_keeps_its_traceback(capsys):
    import torch.nn.functional as F

    from training.loop import trainer_main

    def refused(cfg):
        raise ValueError("--thing must be >= 1")

    def library_bug(cfg):
        F.binary_cross_entropy(torch.rand(4), torch.rand(3))  # torch raises ValueError

    assert trainer_main(refused, lambda argv: None, []) == 2
    assert capsys.readouterr().err == "error: --thing must be >= 1\n"
    with pytest.raises(ValueError, match="target size"):
        trainer_main(library_bug, lambda argv: None, [])
