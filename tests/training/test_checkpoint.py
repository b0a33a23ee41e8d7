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


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_and_an_explicit_one_is_one_line(tmp_path, capsys):
    import pytest

    model = channels_last_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in (2, 4):
        one_step(model, opt)
        save_checkpoint(tmp_path, step, model, opt, {"note": f"at {step}"})
    newest = tmp_path / "checkpoints" / "step_00000004"
    for name, damage in (
        ("model.safetensors", lambda b: b[: len(b) // 2]),  # cut short: a full disk, a crash before the flush
        ("optimizer.safetensors", None),  # missing
        ("state.json", lambda b: b[:40]),
        ("state.json", lambda b: b"[1, 2]"),
    ):
        saved = {p.name: p.read_bytes() for p in newest.iterdir()}
        if damage is None:
            (newest / name).unlink()
        else:
            (newest / name).write_bytes(damage(saved[name]))
        found = latest_checkpoint(tmp_path)
        assert found is not None and found.name == "step_00000002", name
        assert f"{newest} is damaged ({name}" in capsys.readouterr().err
        assert (
            load_checkpoint(found, channels_last_model(), torch.optim.AdamW(channels_last_model().parameters()))[
                "note"
            ]
            == "at 2"
        )
        with pytest.raises(ValueError) as e:  # named explicitly (--resume DIR): one line, nothing loaded
            load_checkpoint(newest, channels_last_model(), torch.optim.AdamW(channels_last_model().parameters()))
        assert "\n" not in str(e.value) and str(newest) in str(e.value), e.value
        for n, data in saved.items():
            (newest / n).write_bytes(data)
    assert latest_checkpoint(tmp_path) == newest and not capsys.readouterr().err


def test_a_resume_trains_with_this_runs_optimizer_settings_and_keeps_the_checkpoints_moments(tmp_path):
    model = channels_last_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999))
    one_step(model, opt)
    save_checkpoint(tmp_path, 1, model, opt, {})
    fresh = channels_last_model()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.5, betas=(0.5, 0.9))  # the new flags
    load_checkpoint(latest_checkpoint(tmp_path), fresh, opt2)
    assert opt2.param_groups[0]["weight_decay"] == 0.5 and opt2.param_groups[0]["betas"] == (0.5, 0.9)
    p = next(fresh.parameters())
    assert torch.equal(opt2.state[p]["exp_avg"], opt.state[next(model.parameters())]["exp_avg"])


def test_a_checkpoint_saved_without_fp16_resumes_into_an_fp16_scaler():
    import pytest

    from training.checkpoint import load_scaler, resume_fields

    scaler = torch.amp.GradScaler("cpu", enabled=True)  # what an fp16 relaunch builds (on "cuda" there)
    with pytest.raises(RuntimeError):  # what load_state_dict does with a disabled scaler's empty state
        scaler.load_state_dict({})
    load_scaler(scaler, {})
    assert scaler.get_scale() == 65536.0  # a fresh scale
    with pytest.raises(ValueError, match="state.json lacks metrics, data, world_size, workers") as e:
        resume_fields({"step": 3, "scaler": {}, "train_seconds": 1.0}, "CKPT", "step", "metrics")
    assert "\n" not in str(e.value)


def test_a_kill_before_the_first_pointer_write_resumes_from_the_checkpoint_on_disk(tmp_path):
    model = channels_last_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    save_checkpoint(tmp_path, 3, model, opt, {"note": "three"})
    (tmp_path / "checkpoints" / "latest").unlink()  # killed between the directory's rename and the pointer's write
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert latest_checkpoint(tmp_path / "never-trained") is None
