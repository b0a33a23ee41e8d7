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
    watch.check(2, lr=1e-3)  # finite so far: no error, but step 2's weights were not probed
    watch.check(4, lr=1e-3, probe=lambda: torch.tensor(0.4))  # step 4's weights give a finite loss
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
    probed = DivergenceWatch(torch.device("cpu"))  # finite losses so far, but the weights now give NaN
    probed.see(torch.tensor(0.5))
    with pytest.raises(ValueError, match="^step 3: the loss became NaN"):
        probed.check(3, lr=1.0, probe=lambda: torch.tensor(math.nan))


def test_the_watch_is_off_where_a_grad_scaler_skips_bad_steps():
    watch = DivergenceWatch(torch.device("cpu"), enabled=False)
    watch.see(torch.tensor(math.nan))
    watch.check(3, lr=1.0)


@pytest.fixture
def shards(tmp_path):
    write_demo_shards(str(tmp_path / "train"), 48, seed=0, size=32, per_shard=48)
    write_demo_shards(str(tmp_path / "eval"), 16, seed=1, size=32, per_shard=16)
    return tmp_path


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []


# One AdamW step at lr 1e30 makes every weight ~1e30; the next forward pass overflows. The step's own training loss
# is still finite, so only the probe (the current weights on the last batch) sees it before the save.
DIVERGE = dict(lr=1e30, warmup_steps=1, grad_clip=0, workers=1, shuffle_buffer=8)


def test_the_update_that_diverges_is_caught_before_its_checkpoint_or_export(shards):
    out = shards / "run"
    with pytest.raises(ValueError, match=r"^step 1: the loss became NaN or infinite after step 0; nothing from"):
        train(base_cfg(shards, out, steps=6, save_every=1, **DIVERGE))
    assert checkpoints(out) == []
    one = shards / "one"  # a run whose only update diverges: the final save and export are refused too
    with pytest.raises(ValueError, match="^step 1: the loss became NaN or infinite"):
        train(base_cfg(shards, one, steps=1, **DIVERGE))
    assert checkpoints(one) == [] and not (one / "open_clip_model.safetensors").exists()


def test_a_resumed_run_names_its_own_last_good_step_and_keeps_that_checkpoint(shards):
    out = shards / "run"
    train(base_cfg(shards, out, steps=6, stop_after=2, save_every=2, workers=1))
    with pytest.raises(ValueError, match=r"^step 3: the loss became NaN or infinite after step 2; .*resume from"):
        train(base_cfg(shards, out, steps=6, save_every=1, **DIVERGE))
    assert checkpoints(out) == ["latest", "step_00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_no_evaluation_of_diverged_weights_is_reported(shards, capsys):
    out = shards / "run"
    cfg = base_cfg(shards, out, steps=6, log_every=6, eval_every=2, eval_data=str(shards / "eval"), **DIVERGE)
    with pytest.raises(ValueError, match="^step 2: the loss became NaN or infinite after step 0"):
        train(cfg)
    assert "eval step" not in capsys.readouterr().out
