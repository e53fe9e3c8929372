"""ASAM's Rank-Constrained Subspace Learning (Wang et al., §4.2-4.3, Eq. 8-12) and the Table 4
alignment alternatives (cosine, ℓ2).

h_i = f_ϕ(z_i) (Eq. 8) is the edit layer's hidden state for the original input z_0 and the
variants z_1..z_n; H_s = [ĥ_0, ..., ĥ_n]ᵀ with ĥ_i = h_i/‖h_i‖₂; σ_1 ≥ ... ≥ σ_{n+1} are the singular
values of H_s and L_align = −log softmax(σ/τ)_1 (Eq. 10). ĥ_0 is detached: gradients flow only
through the variants (Eq. 11, the sum excludes i = 0).

Pooling: the paper gives one vector h_i ∈ ℝ^d per input but not which token. Default "last": the
last real token, which in a causal decoder has attended to every (perturbed) token of the prompt
and is where the answer is predicted (the same "last hidden state" ODEdit Eq. 6 uses); "mean" (a
masked mean over tokens) is the alternative.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Pooling = Literal["last", "mean"]
Align = Literal["rcsl", "cosine", "l2"]
ALIGNS: tuple[str, ...] = ("rcsl", "cosine", "l2")


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor | None = None,
                pooling: Pooling = "last") -> torch.Tensor:
    """(B, T, d) token states -> (B, d), one vector per input. ``mask`` (B, T) marks real tokens;
    "last" takes the last True position, so left and right padding both work."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, d), got {tuple(hidden.shape)}")
    batch, length, _ = hidden.shape
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
    mask = mask.to(torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every input needs at least one real token")
    if pooling == "last":
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)
        return hidden[torch.arange(batch, device=hidden.device), last]
    if pooling == "mean":
        weight = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weight).sum(dim=1) / weight.sum(dim=1)
    raise ValueError(f"unknown pooling {pooling!r}")


def _split(h0: torch.Tensor, variants: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d,) anchor, detached (Eq. 11), and (n, d) variants, both float32 (SVD has no bf16 kernel)."""
    anchor = h0.detach().float().reshape(-1)
    v = variants.float()
    if v.dim() == 1:
        v = v.unsqueeze(0)
    if v.dim() != 2 or v.shape[1] != anchor.shape[0]:
        raise ValueError(f"variants must be (n, {anchor.shape[0]}), got {tuple(variants.shape)}")
    return anchor, v


def rcsl_loss(h0: torch.Tensor, variants: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Eq. 10 with Eq. 11's asymmetric flow: −log(exp(σ_1/τ) / Σ_j exp(σ_j/τ)) over the singular
    values of H_s = normalise([h_0.detach(); h_1..h_n]).

    With all rows ℓ2-normalised, Σ_j σ_j² = n + 1 is fixed, and the loss is smallest when H_s has
    rank one (σ_1 = sqrt(n+1), the rest 0): log(1 + n·exp(−sqrt(n+1)/τ)).
    """
    if tau <= 0:
        raise ValueError("tau must be > 0")
    anchor, v = _split(h0, variants)
    h_s = F.normalize(torch.cat([anchor.unsqueeze(0), v]), dim=-1)
    sigma = torch.linalg.svdvals(h_s)  # descending, so sigma[0] is σ_1
    # Eq. 10 sums over n+1 singular values; when d < n+1 the missing ones are zeros.
    sigma = F.pad(sigma, (0, h_s.shape[0] - sigma.shape[0]))
    return -torch.log_softmax(sigma / tau, dim=0)[0]


def cosine_align_loss(h0: torch.Tensor, variants: torch.Tensor) -> torch.Tensor:
    """Table 4 "Cosine Align": mean_i (1 − cos(h_i, h_0)), h_0 detached as in Eq. 11 so the
    ablation changes only the objective."""
    anchor, v = _split(h0, variants)
    return (1.0 - F.cosine_similarity(v, anchor.unsqueeze(0), dim=-1)).mean()


def l2_align_loss(h0: torch.Tensor, variants: torch.Tensor) -> torch.Tensor:
    """Table 4 "ℓ2-norm Align": mean_i ‖h_i − h_0‖²/d on the raw (unnormalised) states, h_0
    detached. Raw because the paper calls it a "magnitude-based" constraint; squared for a smooth
    gradient at 0; divided by d so its size does not grow with the hidden width."""
    anchor, v = _split(h0, variants)
    return (v - anchor.unsqueeze(0)).pow(2).mean(dim=-1).mean()


def alignment_loss(h0: torch.Tensor, variants: torch.Tensor, align: Align = "rcsl",
                   tau: float = 4.0) -> torch.Tensor:
    """L_align under ASAM Table 4's ``align`` setting."""
    if align == "rcsl":
        return rcsl_loss(h0, variants, tau)
    if align == "cosine":
        return cosine_align_loss(h0, variants)
    if align == "l2":
        return l2_align_loss(h0, variants)
    raise ValueError(f"unknown align {align!r}; expected one of {ALIGNS}")


def asam_total(l_rel: torch.Tensor, l_loc: torch.Tensor, l_align: torch.Tensor,
               beta: float = 10.0) -> torch.Tensor:
    """Eq. 12: L_total = L_rel + L_loc + β·L_align (β = 10, Table 5)."""
    return l_rel + l_loc + beta * l_align
