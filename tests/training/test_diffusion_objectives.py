"""The diffusion objective: the schedule against its formula and diffusers, noising, targets, weights, CFG dropout."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from training.objectives import (
    add_noise,
    alphas_cumprod,
    cfg_dropout,
    diffusion_loss,
    min_snr_weights,
    sample_noise,
    sample_timestep,
    scaled_linear_betas,
    snr,
    swap_in_empty,
    v_target,
)

torch.set_num_threads(1)


def test_schedule_matches_formula_and_diffusers():
    betas = scaled_linear_betas()
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    for t in (0, 1, 499, 998, 999):  # sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)
        want = (math.sqrt(0.00085) + t / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2
        assert float(betas[t]) == pytest.approx(want, rel=1e-12)
    abar = alphas_cumprod(betas)
    prod = 1.0
    for t in range(1000):
        prod *= 1.0 - float(betas[t])
        if t in (0, 10, 500, 999):
            assert float(abar[t]) == pytest.approx(prod, rel=1e-12)
    assert torch.all(abar[1:] < abar[:-1])
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(ref.betas.double(), betas, rtol=1e-5, atol=1e-9)
    assert torch.allclose(ref.alphas_cumprod.double(), abar, rtol=1e-5, atol=1e-7)  # diffusers computes in float32
    assert float(abar[-1]) == pytest.approx(0.0047, abs=1e-4)  # SD's schedule leaves some signal at t = 999


def test_add_noise_v_target_and_identities():
    abar = alphas_cumprod(scaled_linear_betas()).float()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 600, 999])
    xt = add_noise(x0, eps, t, abar)
    for i in range(5):
        a = float(abar[t[i]])
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-6)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(xt, ref.add_noise(x0, eps, t), atol=1e-5)
    v = v_target(x0, eps, t, abar)
    assert torch.allclose(v, ref.get_velocity(x0, eps, t), atol=1e-5)
    a = abar[t].reshape(-1, 1, 1, 1)
    # x0 = sqrt(a) x_t - sqrt(1-a) v and eps = sqrt(1-a) x_t + sqrt(a) v: v and x_t determine both
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)
    assert torch.allclose((1 - a).sqrt() * xt + a.sqrt() * v, eps, atol=1e-5)


def test_losses_and_min_snr_weights():
    abar = alphas_cumprod(scaled_linear_betas()).float()
    t = torch.tensor([0, 100, 500, 999])
    s = snr(t, abar)
    assert torch.allclose(s, (abar[t] / (1 - abar[t])).float())
    w = min_snr_weights(t, abar, 5.0, "epsilon")
    assert torch.allclose(w, torch.minimum(s, torch.tensor(5.0)) / s)
    assert float(w[0]) < 0.01 and float(w[-1]) == pytest.approx(1.0)  # low noise (huge SNR) is down-weighted
    wv = min_snr_weights(t, abar, 5.0, "v_prediction")
    assert torch.allclose(wv, torch.minimum(s, torch.tensor(5.0)) / (s + 1))
    g = torch.Generator().manual_seed(1)
    x0, eps, pred = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    loss, per = diffusion_loss(pred, x0, eps, t, abar)
    assert torch.allclose(per, ((pred - eps) ** 2).mean((1, 2, 3))) and float(loss) == pytest.approx(float(per.mean()))
    loss_v, per_v = diffusion_loss(pred, x0, eps, t, abar, "v_prediction", min_snr_gamma=5.0)
    assert torch.allclose(per_v, ((pred - v_target(x0, eps, t, abar)) ** 2).mean((1, 2, 3)))
    assert float(loss_v) == pytest.approx(float((per_v * wv).mean()), rel=1e-6)
    assert float(diffusion_loss(eps, x0, eps, t, abar)[0]) == 0.0
    with pytest.raises(ValueError, match="prediction"):
        diffusion_loss(pred, x0, eps, t, abar, "sample")


def test_cfg_dropout_swaps_in_the_empty_embedding():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(4000, 16, 32, generator=g)
    empty = torch.randn(16, 32, generator=g)
    out, dropped = cfg_dropout(emb, empty, 0.1, torch.Generator().manual_seed(3))
    assert dropped.dtype == torch.bool and 0.08 < dropped.float().mean() < 0.12
    assert torch.equal(out[dropped], empty.expand(int(dropped.sum()), 16, 32))  # exactly the empty embedding
    assert torch.equal(out[~dropped], emb[~dropped])  # the others untouched
    assert not torch.equal(out, emb)
    again, dropped2 = cfg_dropout(emb, empty, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(dropped, dropped2) and torch.equal(out, again)
    assert torch.equal(cfg_dropout(emb[:50], empty, 0.0)[0], emb[:50])
    assert torch.equal(swap_in_empty(emb[:3], empty, torch.tensor([False, True, False]))[1], empty)


def test_offset_noise():
    g = torch.Generator().manual_seed(4)
    plain = sample_noise((2000, 4, 8, 8), 0.0, g)
    assert plain.std().item() == pytest.approx(1.0, rel=0.01)
    offset = sample_noise((2000, 4, 8, 8), 0.5, torch.Generator().manual_seed(4))
    means = offset.mean((2, 3))  # per sample and channel: the offset's std (0.5) shows in the spatial means
    assert means.std().item() == pytest.approx(math.sqrt(0.25 + 1 / 64), rel=0.05)
    assert plain.mean((2, 3)).std().item() == pytest.approx(1 / 8, rel=0.05)
    assert sample_noise((4, 8, 8), 0.1, torch.Generator().manual_seed(5)).shape == (4, 8, 8)


def test_timestep_sampling_uniform_and_logit_normal():
    g = torch.Generator().manual_seed(6)
    uniform = torch.stack([sample_timestep(g) for _ in range(4000)])
    assert uniform.dtype == torch.int64 and uniform.min() >= 0 and uniform.max() <= 999
    assert (uniform < 100).float().mean().item() == pytest.approx(0.1, abs=0.02)  # flat over [0, 1000)
    g = torch.Generator().manual_seed(6)
    ln = torch.stack([sample_timestep(g, "logit_normal", 0.0, 1.0) for _ in range(4000)])
    assert ln.min() >= 0 and ln.max() <= 999
    # floor(1000 * sigmoid(u)), u ~ N(0, 1): P(t < 100) = P(u < logit(0.1)) = Phi(-2.197) = 0.014; median 500
    assert (ln < 100).float().mean().item() == pytest.approx(0.014, abs=0.008)
    assert ln.float().median().item() == pytest.approx(500, abs=25)
    shifted = torch.stack([sample_timestep(g, "logit_normal", 1.0, 1.0) for _ in range(4000)])
    assert shifted.float().median().item() == pytest.approx(1000 / (1 + math.exp(-1)), abs=25)  # sigmoid(1): 731
    a = sample_timestep(torch.Generator().manual_seed(9), "logit_normal", 0.0, 1.0)
    assert torch.equal(a, sample_timestep(torch.Generator().manual_seed(9), "logit_normal", 0.0, 1.0))
    with pytest.raises(ValueError, match="unknown timestep sampling 'lognormal'"):
        sample_timestep(g, "lognormal")
