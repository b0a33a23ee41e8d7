"""Checkpoints: an optimizer's state comes back with its parameters' memory layout (the fused CUDA AdamW needs it)."""

import torch

from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def channels_last_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 3))
    return model.to(memory_format=torch.channels_last)


def one_step(model, opt) -> None:
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_optimizer_state_gets_the_parameters_strides_back(tmp_path):
    model = channels_last_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, opt)
    conv = model[0].weight
    assert not conv.is_contiguous() and opt.state[conv]["exp_avg"].stride() == conv.stride()
    save_checkpoint(tmp_path, 1, model, opt, {"note": "t"})

    fresh = channels_last_model()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    doc = load_checkpoint(latest_checkpoint(tmp_path), fresh, opt2)
    assert doc["step"] == 1 and doc["note"] == "t"
    for p, old in zip(fresh.parameters(), model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt2.state[p][key]
            assert state.stride() == p.stride(), (key, state.stride(), p.stride())  # stored contiguous
            assert torch.equal(state, opt.state[old][key])
    # and the resumed optimizer takes the same next step as the uninterrupted one
    torch.manual_seed(1)
    one_step(model, opt)
    torch.manual_seed(1)
    one_step(fresh, opt2)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_saving_a_step_again_never_leaves_latest_pointing_at_nothing(tmp_path, monkeypatch):
    from pathlib import Path

    model = channels_last_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    save_checkpoint(tmp_path, 5, model, opt, {"note": "five"})
    save_checkpoint(tmp_path, 10, model, opt, {"note": "first ten"})
    real_rename = Path.rename

    def killed_after_moving_the_old_one_aside(self, target):
        if self.name.startswith(".tmp-"):  # the new copy of step 10 is about to take its place: "SIGKILL" here
            raise KeyboardInterrupt("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_moving_the_old_one_aside)
    try:
        save_checkpoint(tmp_path, 10, model, opt, {"note": "second ten"})  # a finished run, relaunched
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    found = latest_checkpoint(tmp_path)
    assert found is not None and load_checkpoint(found, channels_last_model())["step"] == 10  # not a restart
    save_checkpoint(tmp_path, 10, model, opt, {"note": "third ten"})  # the relaunch, finishing this time
    assert load_checkpoint(latest_checkpoint(tmp_path), channels_last_model())["note"] == "third ten"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == [
        "step_00000005",
        "step_00000010",
    ]


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    model = channels_last_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in (10, 20):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=1)
    save_checkpoint(tmp_path, 15, model, opt, {}, keep=1)  # resumed from an earlier checkpoint, saving again
    assert latest_checkpoint(tmp_path).name == "step_00000015"  # not pruned because a stale 20 sorts later
    assert not (tmp_path / "checkpoints" / "step_00000010").exists()  # older ones still go


def test_a_resume_path_that_is_no_checkpoint_is_a_one_line_error(tmp_path):
    import pytest

    from training.checkpoint import read_state

    with pytest.raises(ValueError, match="not a checkpoint directory"):
        read_state(tmp_path / "typo")
    (tmp_path / "state.json").write_text("{cut")
    with pytest.raises(ValueError, match="unreadable checkpoint state") as e:
        read_state(tmp_path)
    assert "\n" not in str(e.value)


def test_a_checkpoint_of_another_architecture_is_a_one_line_error(tmp_path):
    import pytest

    model = channels_last_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    save_checkpoint(tmp_path, 1, model, opt, {})
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.GroupNorm(2, 16), torch.nn.Conv2d(16, 4, 3))
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="holds another model") as err:
        load_checkpoint(latest_checkpoint(tmp_path), other, torch.optim.AdamW(other.parameters()))
    assert "\n" not in str(err.value) and "--resume none" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))  # nothing was loaded
