"""Learning-rate schedules under a time box: with --budget-schedule the cosine ends at --max-minutes when that comes
before --steps."""

import math
from dataclasses import replace

import pytest

from tests.training.test_train_ldm import base_cfg, env  # noqa: F401 (env: the module's latents fixture)
from training import train_clip, train_ldm
from training.loop import schedule_at
from training.train_ldm import LdmTrainConfig, train
from training.train_vae import VaeTrainConfig


def cosine(at: float, lr=1.0, min_lr=0.1, warmup=10, steps=100) -> float:
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, (at - warmup) / (steps - warmup))))


def test_schedule_follows_the_time_box_when_it_binds():
    cfg = LdmTrainConfig(
        data="d", out="o", steps=100, warmup=10, lr=1.0, min_lr=0.1, max_minutes=1.0, budget_schedule=True
    )
    lr_at = train_ldm.lr_at
    assert lr_at(50, cfg, 60.0) == pytest.approx(0.1)  # the box is used up: the end of the decay
    assert lr_at(20, cfg, 45.0) == pytest.approx(cosine(75))  # three quarters of the box, a fifth of the steps
    assert lr_at(80, cfg, 30.0) == pytest.approx(cosine(80))  # the steps bind: the step schedule
    assert lr_at(5, cfg, 59.0) == pytest.approx(0.6)  # the warm-up counts steps
    off = replace(cfg, budget_schedule=False)
    assert lr_at(50, off, 60.0) == pytest.approx(cosine(50))
    assert lr_at(50, replace(cfg, max_minutes=0.0), 60.0) == pytest.approx(cosine(50))
    assert schedule_at(cfg, 20, 45.0) == pytest.approx(75.0) and schedule_at(off, 20, 45.0) == 20.0

    clip = train_clip.ClipTrainConfig(data="d", out="o", steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    boxed = replace(clip, max_minutes=1.0, budget_schedule=True)
    assert train_clip.lr_at(20, boxed, 45.0) == pytest.approx(cosine(75))
    assert train_clip.lr_at(20, clip, 45.0) == pytest.approx(cosine(20))
    assert train_clip.lr_at(20, replace(boxed, budget_schedule=False), 45.0) == pytest.approx(cosine(20))  # default
    vae = VaeTrainConfig(data="d", out="o", steps=100, max_minutes=2.0)
    assert not vae.budget_schedule and schedule_at(vae, 10, 60.0) == 10.0
    assert schedule_at(replace(vae, budget_schedule=True), 10, 60.0) == pytest.approx(50.0)


def test_a_time_boxed_run_ends_its_decay_at_the_box(env, tmp_path):  # noqa: F811
    data = env["root"] / "lat"
    kw = {"steps": 100_000, "warmup": 1, "max_minutes": 0.04, "workers": 0, "log_every": 1}
    boxed = train(base_cfg(data, tmp_path / "boxed", budget_schedule=True, **kw))
    last = boxed["train"][-1]
    assert 1 < boxed["step"] < 100_000 and last["train_seconds"] >= 2.4  # stopped by the box
    assert last["lr"] < 0.05 * 2e-3  # near the end of the cosine, after a small share of the steps
    lrs = [r["lr"] for r in boxed["train"]]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # decaying from the warm-up on
    plain = train(base_cfg(data, tmp_path / "plain", **kw))  # the default: the step cosine
    assert plain["train"][-1]["lr"] > 0.99 * 2e-3  # the step cosine has hardly started
