"""ASAM's equations on hand-built tensors: LAR (Eq. 4-5) and RCSL (Eq. 8-12, Table 4's
cosine / ℓ2 alternatives)."""

from __future__ import annotations

import math

import pytest
import torch

from mmke.regularizers.lar import lar_variants, perturbation_norm, project, random_in_ball
from mmke.regularizers.rcsl import (alignment_loss, asam_total, cosine_align_loss, l2_align_loss,
                                    pool_hidden, rcsl_loss)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- RCSL, Eq. 10-11 ----------------------------------------------------------------------

def test_eq10_rank_one_value_by_hand():
    h0 = torch.tensor([1.0, 2.0, 2.0])
    variants = torch.stack([h0 * s for s in (0.5, 1.0, 3.0, 10.0)])   # same direction, any length
    n, tau = 4, 4.0
    expected = math.log(1 + n * math.exp(-math.sqrt(n + 1) / tau))   # σ = (√5, 0, 0, 0, 0)
    assert rcsl_loss(h0, variants, tau).item() == pytest.approx(expected, abs=1e-5)


def test_eq10_orthogonal_variants_by_hand():
    eye = torch.eye(5)
    # H_s = I_5: all singular values 1, softmax uniform
    assert rcsl_loss(eye[0], eye[1:], tau=4.0).item() == pytest.approx(math.log(5), abs=1e-5)


def test_eq10_is_minimal_for_rank_one_and_grows_with_spread():
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(16, generator=g)
    noise = torch.randn(4, 16, generator=g)
    losses = [rcsl_loss(h0, h0.unsqueeze(0) + s * noise).item() for s in (0.0, 0.1, 0.5, 2.0, 20.0)]
    assert losses == sorted(losses) and losses[0] < losses[-1]
    rank_one = losses[0]
    for seed in range(20):
        r = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + seed))
        assert rcsl_loss(h0, r).item() > rank_one


@pytest.mark.parametrize("align", ["rcsl", "cosine", "l2"])
def test_eq11_no_gradient_reaches_h0(align):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 6, generator=g, requires_grad=True)
    x0 = torch.randn(8, generator=g, requires_grad=True)
    xs = torch.randn(3, 8, generator=g, requires_grad=True)
    h0, hv = x0 @ weight, xs @ weight          # the same "edit layer" for anchor and variants
    loss = alignment_loss(h0, hv, align)
    g_x0, g_xs, g_w = torch.autograd.grad(loss, [x0, xs, weight], allow_unused=True)
    assert g_x0 is None or torch.count_nonzero(g_x0) == 0
    assert g_xs is not None and g_xs.abs().sum() > 0
    # W's gradient is exactly the variants' path: recomputing with a constant anchor gives the same
    (g_w_const,) = torch.autograd.grad(alignment_loss((x0 @ weight).detach(), xs @ weight, align), [weight])
    assert torch.equal(g_w, g_w_const)


def test_alternative_alignments_by_hand():
    h0 = torch.tensor([1.0, 0.0])
    variants = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    assert cosine_align_loss(h0, variants).item() == pytest.approx((1.0 + 0.0) / 2)
    # ‖(−1, 2)‖² / 2 = 2.5 and ‖(2, 0)‖² / 2 = 2 -> mean 2.25
    assert l2_align_loss(h0, variants).item() == pytest.approx(2.25)
    assert asam_total(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.5), beta=10).item() == 8.0
    with pytest.raises(ValueError):
        alignment_loss(h0, variants, "nope")


def test_pooling_last_real_token_with_either_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[True, True, True, False],      # right-padded: last real token at 2
                         [False, True, True, True]])     # left-padded: last real token at 3
    assert pool_hidden(hidden, mask, "last").squeeze(-1).tolist() == [2.0, 7.0]
    assert pool_hidden(hidden, mask, "mean").squeeze(-1).tolist() == [1.0, 6.0]
    assert pool_hidden(hidden).squeeze(-1).tolist() == [3.0, 7.0]


# --- LAR, Eq. 4-5 ---------------------------------------------------------------------------

def _quadratic(center: torch.Tensor):
    def loss(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (z - center).pow(2).sum()
    return loss


@pytest.mark.parametrize("norm", ["l2_sequence", "l2_token", "linf"])
def test_lar_stays_in_the_ball_and_beats_a_random_perturbation(norm):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 8, generator=g)
    center = torch.randn(6, 8, generator=g)
    eps = 0.05
    loss = _quadratic(center)
    variants = lar_variants(z, loss, n=4, epsilon=eps, norm=norm, generator=g)
    assert variants.shape == (4, 6, 8)
    delta = variants - z
    assert torch.all(perturbation_norm(delta, norm) <= eps * (1 + 1e-5))
    for i in range(4):
        lar_gain = loss(variants[i]) - loss(z)
        for trial in range(10):
            r = torch.randn(6, 8, generator=g)
            if norm == "linf":
                r = r.sign() * delta[i].abs()                    # same |δ| per coordinate
            elif norm == "l2_token":
                r = r / r.norm(dim=-1, keepdim=True) * delta[i].norm(dim=-1, keepdim=True)
            else:
                r = r / r.norm() * delta[i].norm()
            assert lar_gain > loss(z + r) - loss(z)


def test_lar_default_norm_is_per_sequence_l2():
    z = torch.zeros(3, 4)
    variants = lar_variants(z, _quadratic(torch.ones(3, 4)), n=2, epsilon=1e-3,
                            generator=torch.Generator().manual_seed(3))
    norms = (variants - z).flatten(1).norm(dim=1)
    assert torch.all(norms <= 1e-3 * (1 + 1e-5))
    assert torch.all(norms > 0.9e-3)          # random start + a full ε step end on the sphere


def test_lar_never_perturbs_padding_and_keeps_z_graph_and_leaves_params_alone():
    g = torch.Generator().manual_seed(4)
    source = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    z = source * 2.0                                   # z carries a graph back to "the projector"
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    model = torch.nn.Linear(4, 1)

    def loss(zz: torch.Tensor) -> torch.Tensor:
        return model(zz).pow(2).sum()

    variants = lar_variants(z, loss, n=3, epsilon=0.1, norm="l2_token", generator=g, mask=mask)
    assert torch.all(variants[:, 0, 3:] == z.detach()[0, 3:])
    assert all(p.grad is None for p in model.parameters())
    variants.sum().backward()
    assert torch.allclose(source.grad, torch.full_like(source, 3 * 2.0))


def test_projection_and_random_start():
    d = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    assert torch.allclose(project(d, 1.0, "l2_token"), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    assert torch.allclose(project(d, 0.35, "linf"), torch.tensor([[0.35, 0.35], [0.3, 0.35]]))
    start = random_in_ball((500, 2, 3), 0.5, "l2_sequence", torch.Generator().manual_seed(5))
    radii = start.flatten(1).norm(dim=1)
    assert torch.all(radii <= 0.5 + 1e-6)
    # uniform in a 6-ball: P(r < ε/2) = 2^-6 ≈ 1.6%
    assert 0 < (radii < 0.25).float().mean().item() < 0.06
