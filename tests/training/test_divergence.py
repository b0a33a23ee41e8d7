"""A diverged run (NaN or infinite loss) stops with one line before it saves, samples or exports its weights."""

import math

import pytest
import torch

from tests.training.test_train_clip import base_cfg
from training.loop import DivergenceWatch
from training.synthetic import write_demo_shards
from training.train_clip import train

torch.set_num_threads(1)


def test_the_watch_remembers_a_non_finite_loss_until_it_is_checked():
    watch = DivergenceWatch(torch.device("cpu"))
    watch.see(torch.tensor(0.5))
    watch.check(4, lr=1e-3)  # finite so far: no error
    watch.see(torch.tensor(math.nan))
    watch.see(torch.tensor(0.25))  # a finite loss later does not clear it
    with pytest.raises(
        ValueError, match=r"^step 7: the loss became NaN or infinite after step 4; .*--lr \(now 0.001\)"
    ):
        watch.check(7, lr=1e-3)
    inf = DivergenceWatch(torch.device("cpu"))
    inf.see(torch.tensor([1.0, math.inf]))
    with pytest.raises(ValueError, match="NaN or infinite after step 0"):
        inf.check(1, lr=1.0)


def test_the_watch_is_off_where_a_grad_scaler_skips_bad_steps():
    watch = DivergenceWatch(torch.device("cpu"), enabled=False)
    watch.see(torch.tensor(math.nan))
    watch.check(3, lr=1.0)


def test_a_diverging_clip_run_stops_before_saving_or_exporting_diverged_weights(tmp_path):
    write_demo_shards(str(tmp_path / "train"), 48, seed=0, size=32, per_shard=48)
    out = tmp_path / "run"  # one AdamW step at lr 1e30 makes every weight ~1e30: the next forward pass overflows
    cfg = base_cfg(tmp_path, out, lr=1e30, warmup_steps=1, grad_clip=0, workers=1, shuffle_buffer=8, save_every=1)
    with pytest.raises(ValueError, match=r"^step 2: the loss became NaN or infinite after step 1; nothing from"):
        train(cfg)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert not (out / "open_clip_model.safetensors").exists()
