"""ODEdit's equations on hand-built tensors: Eq. 3 (KL direction), Eq. 6 (MMD and Table 4's
variants), Eq. 9-13 (TV-ℓ1 / IRMv1 ω-gradient, the λ network, the dual ascent step)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmke.regularizers.divergence import kl_post_pre_logprobs, locality_kl
from mmke.regularizers.irm_tv import (AdaptiveLambda, FixedLambda, LambdaNet, ParameterSketch,
                                      irmv1_penalty, make_lambda, scale_logits, tv_l1_penalty,
                                      tv_objective)
from mmke.regularizers.mmd import (contrastive_risk, gaussian_kernel, generality_risk,
                                   linear_kernel, median_bandwidths, mmd2)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- Eq. 3 -------------------------------------------------------------------------------------

def test_eq3_is_kl_post_given_pre_not_the_reverse():
    p_post = torch.tensor([0.9, 0.1])
    p_pre = torch.tensor([0.5, 0.5])
    kl_post_pre = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)   # 0.36806
    kl_pre_post = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)   # 0.51083
    assert abs(kl_post_pre - kl_pre_post) > 0.1
    got = locality_kl(p_post.log(), p_pre.log())   # log-probs are valid logits
    assert got.item() == pytest.approx(kl_post_pre, abs=1e-6)
    assert got.item() != pytest.approx(kl_pre_post, abs=1e-2)


def test_eq3_mean_over_masked_positions_and_pre_is_constant():
    post = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]]).log().requires_grad_(True)
    pre = torch.tensor([[[0.5, 0.5], [0.2, 0.8], [0.99, 0.01]]]).log().requires_grad_(True)
    mask = torch.tensor([[True, True, False]])
    expected = (0.9 * math.log(1.8) + 0.1 * math.log(0.2) + 0.0) / 2
    got = kl_post_pre_logprobs(post, pre, mask)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    got.backward()
    assert pre.grad is None and post.grad is not None
    assert torch.all(post.grad[0, 2] == 0)     # the masked-out position gets nothing


# --- Eq. 6 and Table 4 ----------------------------------------------------------------------

def test_eq6_multiscale_gaussian_mmd_matches_hand_computation():
    z_e = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    z_r = torch.tensor([[0.0, 1.0]])
    sigmas = (1.0, 2.0)

    def k(d2: float) -> float:
        return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)

    # squared distances: within Z_E {0, 1, 1, 0}; within Z_R {0}; across {1, 2}
    expected = (2 * k(0) + 2 * k(1)) / 4 + k(0) - 2 * (k(1) + k(2)) / 2
    got = mmd2(z_e, z_r, lambda a, b: gaussian_kernel(a, b, sigmas))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert generality_risk(z_e, z_r, "mmd_m_rbf", bandwidths=sigmas).item() == pytest.approx(expected, abs=1e-6)


def test_eq6_unbiased_estimator_drops_diagonals():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[2.0], [4.0]])
    lin = mmd2(x, y, linear_kernel, unbiased=True)
    # within-x off-diagonal mean = 0*1 = 0; within-y = 2*4 = 8; across mean = (0+0+2+4)/4 = 1.5
    assert lin.item() == pytest.approx(0 + 8 - 3.0)
    with pytest.raises(ValueError):
        mmd2(x[:1], y, linear_kernel, unbiased=True)


@pytest.mark.parametrize("align", ["mmd_s_rbf", "mmd_m_rbf", "mmd_s_linear"])
def test_eq6_is_zero_for_identical_sets(align):
    x = torch.tensor([[0.3, -1.2, 2.0], [0.5, 0.1, -0.7]])
    got = generality_risk(x[:1], x[:1], align, bandwidths=(0.5, 1.0, 4.0))
    assert got.item() == pytest.approx(0.0, abs=1e-7)
    assert mmd2(x, x.clone(), lambda a, b: gaussian_kernel(a, b, (1.0,))).item() == pytest.approx(0.0, abs=1e-7)


def test_linear_kernel_mmd_is_squared_distance_of_means():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, generator=g), torch.randn(2, 5, generator=g)
    expected = (x.mean(0) - y.mean(0)).pow(2).sum()
    assert mmd2(x, y, linear_kernel).item() == pytest.approx(expected.item(), rel=1e-5)


def test_single_rephrase_variants_use_only_the_first_neighbour():
    z_e = torch.tensor([[0.0, 0.0]])
    z_r = torch.tensor([[3.0, 4.0], [100.0, 100.0]])
    assert generality_risk(z_e, z_r, "mmd_s_linear").item() == pytest.approx(25.0)
    single = generality_risk(z_e, z_r, "mmd_s_rbf", bandwidths=(5.0,))
    assert single.item() == pytest.approx(2 - 2 * math.exp(-25 / 50), abs=1e-6)
    multi = generality_risk(z_e, z_r, "mmd_m_rbf", bandwidths=(5.0,))
    assert multi.item() != pytest.approx(single.item(), abs=1e-3)


def test_mmd_gradient_pulls_the_sets_together():
    z_e = torch.tensor([[0.0, 0.0]], requires_grad=True)
    z_r = torch.tensor([[1.0, 0.0]])
    generality_risk(z_e, z_r, "mmd_s_rbf", bandwidths=(1.0, 2.0)).backward()
    assert z_e.grad[0, 0] < 0 and z_e.grad[0, 1] == 0   # descent moves z_e towards z_r


def test_median_bandwidth_heuristic():
    ref = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])   # squared distances 1, 4, 5
    assert median_bandwidths(ref, (1.0, 4.0)) == pytest.approx((2.0, 4.0))
    assert median_bandwidths(torch.zeros(2, 3), (1.0,)) == (1.0,)   # degenerate: falls back


def test_contrast_variant_is_infonce_on_cosine():
    anchor = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[2.0, 0.0]])
    negative = torch.tensor([[0.0, 3.0]])
    got = contrastive_risk(anchor, positive, negative, temperature=0.5)
    # cosines 1 (positive) and 0 (negative), over τ: −log(e² / (e² + e⁰))
    assert got.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-5)
    via_risk = generality_risk(anchor, positive, "contrast", negatives=negative, temperature=0.5)
    assert via_risk.item() == pytest.approx(got.item())
    with pytest.raises(ValueError):
        contrastive_risk(anchor, positive)          # nothing to contrast against


# --- Eq. 9-13 ---------------------------------------------------------------------------------

def _risk_factory(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    def risk(omega: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scale_logits(x @ weight, omega), y)
    return risk


def _fd(fn, at: float, h: float = 1e-5) -> float:
    return (fn(at + h) - fn(at - h)) / (2 * h)


def test_omega_gradient_term_matches_finite_difference():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    risk = _risk_factory(weight, x, y)

    def r(w: float) -> float:
        return risk(torch.tensor(w, dtype=torch.float64)).item()

    omegas = torch.tensor([0.5, 1.0, 2.0])
    fds = [_fd(r, w) for w in omegas.tolist()]
    mean_risk, tv = tv_l1_penalty(risk, omegas)
    _, irm = irmv1_penalty(risk, omegas)
    assert mean_risk.item() == pytest.approx(sum(r(w) for w in omegas.tolist()) / 3, rel=1e-6)
    assert tv.item() == pytest.approx((sum(abs(d) for d in fds) / 3) ** 2, rel=1e-5)
    assert irm.item() == pytest.approx(sum(d * d for d in fds) / 3, rel=1e-5)
    assert tv.item() != pytest.approx(irm.item(), rel=1e-3)   # TV-ℓ1 is not IRMv1's square


def test_tv_penalty_is_differentiable_in_the_edited_parameters():
    """create_graph=True: ∂ penalty / ∂W by autograd equals a finite difference in W."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    omegas = torch.ones(1)

    def penalty(w: torch.Tensor) -> torch.Tensor:
        return tv_l1_penalty(_risk_factory(w, x, y), omegas.double())[1]

    (grad,) = torch.autograd.grad(penalty(weight), weight)
    h = 1e-6
    for i, j in [(0, 0), (2, 1), (3, 2)]:
        bump = torch.zeros_like(weight)
        bump[i, j] = h
        fd = (penalty(weight.detach() + bump) - penalty(weight.detach() - bump)).item() / (2 * h)
        assert grad[i, j].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_lambda_is_positive_for_extreme_inputs():
    net = LambdaNet(in_dim=8, width=16, depth=3, generator=torch.Generator().manual_seed(0))
    inputs = [torch.zeros(8), torch.full((8,), 1e30), torch.full((8,), -1e30),
              torch.tensor([float("inf"), float("-inf"), float("nan")] + [1.0] * 5),
              torch.randn(5, 8, generator=torch.Generator().manual_seed(3)) * 1e6]
    for x in inputs:
        lam = net(x)
        assert torch.isfinite(lam) and lam.item() > 0
    with torch.no_grad():
        net.body[-1].bias.fill_(-1e4)            # Softplus underflows to exactly 0 here
    assert net(torch.zeros(8)).item() > 0
    with torch.no_grad():
        net.body[-1].bias.fill_(1e4)
    assert torch.isfinite(net(torch.zeros(8)))


def test_lambda_net_shape_and_init():
    net = LambdaNet(in_dim=8, width=16, depth=4, generator=torch.Generator().manual_seed(0))
    linears = [m for m in net.body if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 8), (16, 16), (16, 16), (1, 16)]
    assert all(torch.all(m.bias == 0) for m in linears)
    bound = math.sqrt(6 / (8 + 16))                 # Xavier-uniform bound of the first layer
    assert linears[0].weight.abs().max().item() <= bound
    assert isinstance(net.body[1], torch.nn.ReLU) and len(net.body) == 7


def test_same_seed_same_lambda_network_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b = AdaptiveLambda(sketch_dim=16, seed=5), AdaptiveLambda(sketch_dim=16, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)


def test_parameter_sketch_is_linear_seeded_and_scale_preserving():
    g = torch.Generator().manual_seed(4)
    big = torch.randn(300, 341, generator=g) * 0.02     # 102300 elements, not a multiple of 64
    small = torch.randn(7, generator=g)
    sketch = ParameterSketch(dim=64, seed=0)
    y = sketch([big, small])
    assert y.shape == (64,) and y.dtype == torch.float32
    assert torch.equal(y, ParameterSketch(dim=64, seed=0)([big, small]))
    assert not torch.equal(y, ParameterSketch(dim=64, seed=1)([big, small]))
    twice = sketch([2 * big, 2 * small])
    assert torch.allclose(twice, 2 * y, atol=1e-6)
    mean_sq = torch.cat([big.reshape(-1), small]).pow(2).mean().item()
    assert y.pow(2).mean().item() == pytest.approx(mean_sq, rel=0.5)


def test_primal_lambda_reaches_phi_not_delta():
    phi = torch.randn(10, 20, generator=torch.Generator().manual_seed(8), requires_grad=True)
    adaptive = AdaptiveLambda(sketch_dim=32, width=16, depth=3, lr=1e-3, seed=0)
    lam = adaptive.lam([phi])
    lam.backward()
    assert phi.grad is not None and phi.grad.abs().sum() > 0     # App. A.3's ∇_φ λ · penalty
    assert all(p.grad is None for p in adaptive.net.parameters())


def test_one_dual_step_increases_the_objective_in_delta():
    phi = [torch.randn(10, 20, generator=torch.Generator().manual_seed(6))]
    adaptive = AdaptiveLambda(sketch_dim=32, width=8, depth=3, lr=1e-3, seed=0)
    risk, penalty = torch.tensor(1.3), torch.tensor(0.7)
    before = tv_objective(risk, penalty, adaptive.lam(phi)).item()
    lam_before = adaptive.dual_step(phi, penalty)
    after = tv_objective(risk, penalty, adaptive.lam(phi)).item()
    assert lam_before.item() * 0.7 + 1.3 == pytest.approx(before, rel=1e-6)
    assert after > before


def test_alternating_updates_descend_phi_and_ascend_delta():
    """Eq. 13 on a toy: the editor's step lowers G at fixed δ, the dual step raises it at fixed φ."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    weight = torch.randn(4, 3, generator=g).requires_grad_(True)
    editor = torch.optim.SGD([weight], lr=1e-2)
    adaptive = AdaptiveLambda(sketch_dim=8, width=8, depth=3, lr=1e-2, seed=0)
    omegas = torch.ones(1)

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        risk, pen = tv_l1_penalty(_risk_factory(weight, x, y), omegas)
        return tv_objective(risk, pen, adaptive.lam([weight])), pen

    for _ in range(3):
        g_k, pen = objective()
        editor.zero_grad()
        g_k.backward()
        editor.step()
        g_primal, pen_next = objective()
        assert g_primal.item() < g_k.item()
        adaptive.dual_step([weight], pen_next)
        assert objective()[0].item() > g_primal.item()


def test_fixed_lambda_mode():
    fixed = make_lambda(0.01)
    assert isinstance(fixed, FixedLambda)
    phi = [torch.zeros(3)]
    assert fixed.lam(phi).item() == pytest.approx(0.01)
    assert fixed.dual_step(phi, torch.tensor(5.0)).item() == pytest.approx(0.01)
    assert isinstance(make_lambda("adaptive", sketch_dim=8), AdaptiveLambda)
    assert isinstance(make_lambda("1e-4"), FixedLambda)
    with pytest.raises(ValueError):
        make_lambda(-1.0)
