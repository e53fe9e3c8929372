"""ASAM's Latent Adversarial Robustification (Wang et al., §4.1, Eq. 4-5, Def. 4.1).

z = [e_v; e_t] are the joint input embeddings of the edit request. Each of n variants is
z_i* = z + δ_i*, δ_i* ≈ argmax_{‖δ‖ ≤ ε} L_ce(f_θ(z + δ), y*) (Eq. 5), approximated "via single-step
projected gradient ascent with randomized initialization": δ⁰ uniform in the ε-ball, one ascent
step along g_z = ∇_z L_ce (Eq. 4) normalised in the ball's norm, projection back onto the ball.

Norm: Def. 4.1 writes ‖δ‖_p without fixing p and Eq. 5 writes an unsubscripted ‖δ_i‖ on the whole
variant δ_i = [δ_v,i; δ_t,i]; we read that as the ℓ2 norm of the whole perturbed sequence
("l2_sequence", the default). "l2_token" (one ℓ2 ball per token, ε independent of sequence length)
and "linf" (per coordinate, FGSM-style sign step) are settings. Note the scale: with
ε = 1e-3 (Table 5) on a whole sequence, one coordinate moves by about ε/sqrt(T·d), which bf16/fp16
embeddings cannot represent; build the variants in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

LarNorm = Literal["l2_sequence", "l2_token", "linf"]
LAR_NORMS: tuple[str, ...] = ("l2_sequence", "l2_token", "linf")
_TINY = 1e-30


def _group_dims(norm: LarNorm, ndim: int) -> tuple[int, ...]:
    """The dimensions one ball spans: the whole (T, d) sequence, one token's d, or none (ℓ∞)."""
    if norm == "l2_sequence":
        return (-2, -1) if ndim >= 2 else (-1,)
    if norm == "l2_token":
        return (-1,)
    if norm == "linf":
        return ()
    raise ValueError(f"unknown LAR norm {norm!r}; expected one of {LAR_NORMS}")


def perturbation_norm(delta: torch.Tensor, norm: LarNorm) -> torch.Tensor:
    """‖δ‖ per ball (the last two dims for l2_sequence, the last for l2_token, per sequence for
    linf: max |δ| over (T, d))."""
    dims = _group_dims(norm, delta.dim())
    if norm == "linf":
        return delta.abs().amax(dim=(-2, -1) if delta.dim() >= 2 else (-1,))
    return delta.pow(2).sum(dim=dims).sqrt()


def project(delta: torch.Tensor, epsilon: float, norm: LarNorm) -> torch.Tensor:
    """Euclidean projection onto the ε-ball: radial shrink for ℓ2, clamping for ℓ∞."""
    dims = _group_dims(norm, delta.dim())
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    length = delta.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return delta * (epsilon / length.clamp_min(epsilon)).clamp(max=1.0)


def _direction(g: torch.Tensor, norm: LarNorm) -> torch.Tensor:
    """The steepest-ascent unit direction of the norm: g/‖g‖ for ℓ2, sign(g) for ℓ∞."""
    if norm == "linf":
        return g.sign()
    dims = _group_dims(norm, g.dim())
    return g / g.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(_TINY)


def random_in_ball(shape: tuple[int, ...], epsilon: float, norm: LarNorm,
                   generator: torch.Generator | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """δ⁰ uniform in the ε-ball (float32, CPU; move it yourself). ℓ2: a Gaussian direction times
    ε·U^(1/D) with D the ball's unmasked dimension; ℓ∞: U[−ε, ε] per coordinate."""
    if norm == "linf":
        delta = (torch.rand(shape, generator=generator) * 2.0 - 1.0) * epsilon
        return delta if mask is None else delta * mask.unsqueeze(-1).to(delta.dtype).cpu()
    dims = _group_dims(norm, len(shape))
    direction = torch.randn(shape, generator=generator)
    if mask is not None:
        direction = direction * mask.unsqueeze(-1).to(direction.dtype).cpu()
    length = direction.pow(2).sum(dim=dims, keepdim=True).sqrt()
    count = (direction != 0).sum(dim=dims, keepdim=True).clamp_min(1).to(direction.dtype)
    u = torch.rand(length.shape, generator=generator)
    radius = epsilon * torch.exp(torch.log(u.clamp_min(_TINY)) / count)
    return direction / length.clamp_min(_TINY) * radius


def lar_variants(z: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int = 4,
                 epsilon: float = 1e-3, norm: LarNorm = "l2_sequence",
                 step_size: float | None = None, generator: torch.Generator | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4-5: n adversarial variants of z (shape (..., T, d)) -> (n, ..., T, d).

    ``loss_fn`` receives the n perturbed copies stacked, shape (n, ..., T, d), and returns a scalar
    whose gradient w.r.t. copy i is (a positive multiple of) ∇ L_ce at copy i, e.g. the sum or the
    mean of the per-copy edit losses: the step direction is normalised, so the multiple is
    irrelevant, and one batched forward serves all n variants. ``mask`` (..., T) marks the real
    tokens; padding is never perturbed. ``step_size`` defaults to ε (one full-radius step).

    The gradient is taken w.r.t. δ only (z detached, ``autograd.grad``): no parameter ``.grad`` is
    touched. The result is z + δ* with δ* detached and z's graph kept, so an editor that edits the
    modules producing z (e.g. a vision projector) still gets its gradients through the variants.
    """
    if n < 1 or epsilon <= 0:
        raise ValueError("lar_variants needs n >= 1 and epsilon > 0")
    alpha = epsilon if step_size is None else step_size
    base = z.detach().float()
    start = random_in_ball((n, *z.shape), epsilon, norm, generator,
                           None if mask is None else mask.expand(n, *mask.shape))
    delta = start.to(base.device).requires_grad_(True)
    loss = loss_fn(base.unsqueeze(0) + delta)
    (g,) = torch.autograd.grad(loss, delta)
    with torch.no_grad():
        stepped = delta + alpha * _direction(g.float(), norm)
        if mask is not None:
            stepped = stepped * mask.to(stepped.dtype).unsqueeze(-1)
        final = project(stepped, epsilon, norm)
    return z.unsqueeze(0) + final.to(z.dtype)
