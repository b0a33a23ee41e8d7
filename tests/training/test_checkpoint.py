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
