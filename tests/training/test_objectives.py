"""The contrastive loss against a hand computation, and the logit-scale clamp."""

import math

import torch

from training.objectives import MAX_LOGIT_SCALE, clamp_logit_scale, clip_loss

torch.set_num_threads(1)


def hand_loss(img, txt, scale):
    """Symmetric cross-entropy written out with plain floats."""
    n = len(img)
    sim = [[scale * sum(a * b for a, b in zip(img[i], txt[j], strict=True)) for j in range(n)] for i in range(n)]
    rows = [math.log(sum(math.exp(v) for v in sim[i])) - sim[i][i] for i in range(n)]
    cols = [math.log(sum(math.exp(sim[j][i]) for j in range(n))) - sim[i][i] for i in range(n)]
    return (sum(rows) / n + sum(cols) / n) / 2


def test_loss_matches_hand_computation_3x3():
    img = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    txt = [[0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]]
    scale = 2.5
    got = clip_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(scale))
    assert math.isclose(float(got), hand_loss(img, txt, scale), rel_tol=1e-6)
    # asymmetric case: the two directions differ, so swapping roles of rows/cols would be caught
    sim = torch.tensor(img) @ torch.tensor(txt).T
    assert not torch.allclose(sim, sim.T)


def test_perfect_pairs_give_low_loss_and_gradient_reaches_scale():
    feats = torch.eye(3)
    scale = torch.tensor(50.0, requires_grad=True)
    loss = clip_loss(feats, feats, scale)
    assert float(loss.detach()) < 1e-6
    shuffled = clip_loss(feats, feats[[1, 2, 0]], torch.tensor(50.0))
    assert float(shuffled) > 10
    clip_loss(torch.eye(3), torch.eye(3)[[1, 0, 2]], scale).backward()
    assert scale.grad is not None and float(scale.grad) > 0  # wrong pairs: a larger scale hurts


def test_logit_scale_is_clamped_to_100():
    p = torch.nn.Parameter(torch.tensor(math.log(500.0)))
    clamp_logit_scale(p)
    assert math.isclose(float(p.detach().exp()), MAX_LOGIT_SCALE, rel_tol=1e-5)
    q = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    clamp_logit_scale(q)
    assert math.isclose(float(q.detach().exp()), 20.0, rel_tol=1e-6)
