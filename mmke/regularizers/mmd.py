"""ODEdit's generality risk (Su et al., Eq. 4-6) and the Table 4 alternatives.

R_gen = E_{z_e,z'_e~Z_E}[k(z_e,z'_e)] + E_{z_r,z'_r~Z_R}[k(z_r,z'_r)] − 2 E_{z_e~Z_E,z_r~Z_R}[k(z_e,z_r)]
(Eq. 6; the paper's first two terms print k(z, z'_e) and k(z, z'_r), read as k(z_e, z'_e) and
k(z_r, z'_r)), with the multi-scale Gaussian kernel k(a_i, a_j) = Σ_{q=1}^{k} exp(−‖a_i − a_j‖²/(2σ_q²)).
Z_E: last hidden states of the in-scope (edit) prompts; Z_R: those of their semantic neighbours.

Estimator: biased (V-statistic, every pair including i = j). Eq. 6 writes plain expectations with
no correction, and the configuration the paper recommends (Table 4, "MMD-s": one edit prompt and a
*single* rephrase) has one sample per set, where the unbiased U-statistic is undefined. The
unbiased form is offered for ≥ 2 samples per set.

Table 4 (ODEdit §5.4): "MMD-s RBF denotes MMD with a RBF kernel and a single rephrase prompt",
"MMD-s Linear with linear kernel", "MMD-m RBF utilizes multiple rephrase prompts", "Contrast
replace[s] MMD with contrastive learning". So "-s"/"-m" count rephrase prompts (single/multiple),
not kernel scales; "RBF" is Eq. 6's multi-scale Gaussian (§5.1: "a Gaussian RBF kernel with a
multi-scale bandwidth strategy"). A single-scale RBF is Eq. 6 with one bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GenAlign = Literal["mmd_s_rbf", "mmd_s_linear", "mmd_m_rbf", "contrast"]
GEN_ALIGNS: tuple[str, ...] = ("mmd_s_rbf", "mmd_s_linear", "mmd_m_rbf", "contrast")

#: σ_q² = multiplier · σ_base². ODEdit gives no values; five scales spaced by 2 around a base is the
#: multi-kernel MMD convention of DAN (Long et al., 2015: kernel_mul=2, kernel_num=5).
DEFAULT_MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def _as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must be (n, d) or (d,), got {tuple(x.shape)}")
    return x


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_i − b_j‖² for rows of a (n, d) and b (m, d) -> (n, m).

    Explicit differences rather than the ‖a‖² + ‖b‖² − 2ab expansion: exact (no cancellation, so an
    identical pair gives exactly 0) and smooth at zero distance, unlike cdist's square root. The
    sets here are a handful of prompts, so the (n, m, d) temporary is small.
    """
    return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(dim=-1)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Eq. 6's multi-scale Gaussian kernel matrix Σ_q exp(−‖a_i − b_j‖²/(2σ_q²)) -> (n, m).
    One bandwidth gives the single-scale RBF. Summed, not averaged, as the paper writes it."""
    if len(bandwidths) == 0 or any(s <= 0 for s in bandwidths):
        raise ValueError(f"bandwidths must be positive and non-empty, got {list(bandwidths)}")
    d2 = pairwise_sq_dists(a, b)
    sigma2 = torch.tensor([float(s) ** 2 for s in bandwidths], dtype=d2.dtype, device=d2.device)
    return torch.exp(-d2.unsqueeze(-1) / (2.0 * sigma2)).sum(dim=-1)


def linear_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a, b) = ⟨a, b⟩ (Table 4, "MMD-s Linear"); its biased MMD² is ‖mean(a) − mean(b)‖²."""
    return a @ b.transpose(0, 1)


def mmd2(z_e: torch.Tensor, z_r: torch.Tensor, kernel: Kernel, unbiased: bool = False) -> torch.Tensor:
    """Eq. 6: MMD² between the rows of z_e (n, d) and z_r (m, d) under ``kernel``.

    Biased by default (see module docstring). ``unbiased`` drops the i = j terms of the two
    within-set means and needs n, m ≥ 2. Computed in float32.
    """
    x, y = _as_2d(z_e, "z_e").float(), _as_2d(z_r, "z_r").float()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    if not unbiased:
        return k_xx.mean() + k_yy.mean() - 2.0 * k_xy.mean()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("the unbiased MMD² needs at least two samples in each set")
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within_x + within_y - 2.0 * k_xy.mean()


def median_bandwidths(reference: torch.Tensor,
                      multipliers: Sequence[float] = DEFAULT_MULTIPLIERS) -> tuple[float, ...]:
    """Bandwidths σ_q = sqrt(m_q · σ²_base) with σ²_base the median pairwise squared distance of
    the rows of ``reference`` (the median heuristic of Gretton et al., 2012).

    Why data-driven: hidden-state scales differ by orders of magnitude across backbones (tiny vs
    7B), so fixed absolute σ's would saturate the kernel at 0 or 1 on some of them. Call it once per
    edit on fixed, detached states (e.g. the unedited model's states of the edit, neighbour and
    out-of-scope prompts): recomputing σ from the very pair being pulled together would shrink σ
    with the distance, leaving a constant MMD value and an exploding gradient. Falls back to the
    mean squared row norm when fewer than two distinct rows exist, then to 1.0.
    """
    ref = _as_2d(reference.detach(), "reference").float()
    base = 0.0
    if ref.shape[0] >= 2:
        d2 = pairwise_sq_dists(ref, ref)
        upper = d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), diagonal=1)]
        upper = upper[upper > 0]
        if upper.numel():
            base = float(upper.median())
    if base <= 0.0:
        base = float(ref.pow(2).sum(dim=1).mean())
    if not math.isfinite(base) or base <= 0.0:
        base = 1.0
    return tuple(math.sqrt(m * base) for m in multipliers)


def contrastive_risk(anchors: torch.Tensor, positives: torch.Tensor,
                     negatives: torch.Tensor | None = None, temperature: float = 0.1) -> torch.Tensor:
    """Table 4 "Contrast": an instance-level InfoNCE in place of the distribution-level MMD.

    Row i of ``anchors`` (edit prompts) is pulled towards row i of ``positives`` (its rephrase) and
    pushed from the other positives in the set and from ``negatives`` (e.g. out-of-scope prompts of
    the train split), on cosine similarity / temperature. ODEdit names only "contrastive learning";
    InfoNCE (SimCLR/SimCSE form) is the standard reading, and τ = 0.1 is our choice.
    """
    a = F.normalize(_as_2d(anchors, "anchors").float(), dim=-1)
    p = F.normalize(_as_2d(positives, "positives").float(), dim=-1)
    if a.shape != p.shape:
        raise ValueError(f"anchors {tuple(a.shape)} and positives {tuple(p.shape)} must pair up")
    candidates = p
    if negatives is not None and negatives.numel():
        candidates = torch.cat([p, F.normalize(_as_2d(negatives, "negatives").float(), dim=-1)])
    if candidates.shape[0] < 2:
        # One anchor, one positive, nothing to contrast against: the loss would be a constant 0.
        raise ValueError("contrastive_risk needs negatives or at least two anchor/positive pairs")
    logits = a @ candidates.transpose(0, 1) / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, target)


def generality_risk(z_e: torch.Tensor, z_r: torch.Tensor, align: GenAlign = "mmd_s_rbf",
                    bandwidths: Sequence[float] | None = None,
                    negatives: torch.Tensor | None = None, temperature: float = 0.1,
                    unbiased: bool = False) -> torch.Tensor:
    """R_gen under one of ODEdit Table 4's settings.

    z_e (n, d): last hidden states of the in-scope prompts; z_r (m, d): of their neighbours.
    ``mmd_s_*`` keep only the first neighbour (a single rephrase prompt), ``mmd_m_rbf`` uses all of
    them; "rbf" is Eq. 6's multi-scale Gaussian with ``bandwidths`` (median heuristic on
    z_e ∪ z_r, detached, when None), "linear" the inner product. ``contrast``: see
    ``contrastive_risk``.
    """
    x, y = _as_2d(z_e, "z_e"), _as_2d(z_r, "z_r")
    if align == "contrast":
        return contrastive_risk(x, y[: x.shape[0]], negatives, temperature)
    if align in ("mmd_s_rbf", "mmd_s_linear"):
        y = y[:1]
    elif align != "mmd_m_rbf":
        raise ValueError(f"unknown gen_align {align!r}; expected one of {GEN_ALIGNS}")
    if align == "mmd_s_linear":
        return mmd2(x, y, linear_kernel, unbiased)
    sigmas = tuple(bandwidths) if bandwidths is not None else median_bandwidths(torch.cat([x, y]))
    return mmd2(x, y, lambda a, b: gaussian_kernel(a, b, sigmas), unbiased)
