"""MEND's editor networks (Mitchell et al., ICLR 2022, "Fast Model Editing at Scale", §3.1).

The gradient of a loss w.r.t. the weight W (``[d_out, d_in]``) of a linear layer, over a batch of
token positions p, is the sum of rank-1 terms ∇_W L = Σ_p δ_p u_pᵀ: u_p is the layer's input and
δ_p the gradient w.r.t. its output at position p. MEND never forms ∇_W L: a small network g maps
each pair z_p = [u_p; δ_p] to a pseudo-pair [ũ_p; δ̃_p], and the edit is

    W̃ = W − α_ℓ Σ_p δ̃_p ũ_pᵀ                                                         (§3.1)

with α_ℓ a learned per-layer edit rate (``MendNetworks.edit_lrs``).

What is implemented, and where the paper is silent, what the authors' code does:
- Online normalisation (§3.1: u and δ "can differ by several orders of magnitude", so both are
  normalised to zero mean and unit variance before g). ``RunningMoments`` keeps Welford's running
  mean and sum of squared deviations over every factor row seen in training (rows whose u or δ is
  all zero, e.g. padding or positions after the last target, are skipped, as the reference code
  does); a batch of rows is merged exactly by Chan et al.'s parallel update, and under
  ``accelerate launch`` so are the batch moments of every process (``merge_moments``), so that
  each process holds the statistics of the whole batch. Variance is the
  unbiased one (count − 1), as the reference code. The statistics are frozen outside training.
  One pair of statistics per network, i.e. per weight shape, shared by the layers of that shape
  (the reference code's ``shared: true``).
- g (§3.1 Eq. 3, Fig. 2): two residual low-rank blocks over the concatenated z (the reference
  code's ``combine: true``, ``n_hidden: 1``): h = z + σ(s¹_ℓ ⊙ (U₁V₁z + b₁) + o¹_ℓ) and
  g(z) = h + σ(s²_ℓ ⊙ (U₂V₂h + b₂) + o²_ℓ), σ = ReLU (as ``clamp(min=0)``, see
  ``ResidualLowRank.forward``), U_j ∈ ℝ^{d×r} and V_j ∈ ℝ^{r×d} with
  r = min(rank, d). One g per weight shape, shared by the layers of that shape, with the
  layer-specific scale s_ℓ and offset o_ℓ (§3.1 "parameter sharing").
- Initialisation: U_j = 0, b_j = 0, s_ℓ = 1, o_ℓ = 0, V_j Xavier-uniform. Then σ(0) = 0 and g is
  exactly the identity (Fig. 2: "both initialized to compute the exact identity function"), so the
  first edit is the plain pseudo-update of the *normalised* factors, −α Σ_p n(δ_p) n(u_p)ᵀ; with
  identity statistics (mean 0, variance 1) it is exactly the fine-tuning step −α ∇_W L. (The
  reference code draws V from N(0, 1); any V leaves g the identity while U = 0.)
- The sign: the paper writes the edit as a descent step W − α∇̃. The reference code adds
  ``+ edit_lr · pseudo_grad``; with a learned α either sign is reachable. We follow the paper, so
  that the initial edit is a descent step on the edit loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mmke.editors.training import BatchShare


Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def batch_moments(rows: torch.Tensor) -> Moments:
    """(count, mean, M2) of the rows ``[n, dim]`` in float64 (zeros for no rows)."""
    x = rows.detach().to(torch.float64)
    count = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
    if x.shape[0] == 0:
        return count, x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])
    mean = x.mean(dim=0)
    return count, mean, ((x - mean) ** 2).sum(dim=0)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The moments of two sets of rows together, from each set's (Chan, Golub & LeVeque's
    parallel update: exact up to rounding, whatever the split)."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    total = n_a + n_b
    if float(total) == 0:
        return a
    diff = mean_b - mean_a
    mean = mean_a + diff * (n_b / total)
    return total, mean, m2_a + (m2_b + diff ** 2 * (n_a * n_b / total))


class RunningMoments(nn.Module):
    """Welford's running mean and variance of a stream of ``dim``-vectors, merged a batch at a
    time (Chan, Golub & LeVeque's parallel formula: exact, whatever the batch split). Buffers, so
    they are saved with the networks and restored by a resumed fit."""

    def __init__(self, dim: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor, across: BatchShare | None = None) -> None:
        """Merge the rows ``[n, dim]`` into the statistics; with ``across`` (a fit's batch over
        several processes) the rows of every process, merged in process order. Every process
        of ``across`` must call it (a collective), with or without rows."""
        batch = batch_moments(rows)
        if across is not None and across.world > 1:
            dim = batch[1].shape[0]
            every = across.gather_all(torch.cat([batch[0][None], batch[1], batch[2]]))
            batch = (every[0, 0], every[0, 1:dim + 1], every[0, dim + 1:])
            for other in every[1:]:
                batch = merge_moments(batch, (other[0], other[1:dim + 1], other[dim + 1:]))
        count, mean, m2 = merge_moments((self.count, self.mean, self.m2), batch)
        self.count.copy_(count)
        self.mean.copy_(mean)
        self.m2.copy_(m2)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (count − 1); ones until two rows have been seen."""
        if float(self.count) < 2:
            return torch.ones_like(self.m2)
        return self.m2 / (self.count - 1)

    def normalise(self, rows: torch.Tensor) -> torch.Tensor:
        std = self.var.sqrt().to(rows.dtype)
        return (rows - self.mean.to(rows.dtype)) / (std + self.eps)


class ResidualLowRank(nn.Module):
    """One block of g: z + ReLU(s_ℓ ⊙ (U V z + b) + o_ℓ), identity at initialisation (U = 0)."""

    def __init__(self, dim: int, rank: int, n_layers: int) -> None:
        super().__init__()
        mid = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, mid))
        self.V = nn.Parameter(nn.init.xavier_uniform_(torch.empty(mid, dim)))
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))

    def forward(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        pre = (z @ self.V.T) @ self.U.T + self.b
        # ReLU as clamp(min=0): equal values, but its gradient at exactly 0 is 1, not 0. At
        # initialisation every pre-activation is exactly 0 (U = 0, b = 0, o = 0), and with
        # torch.relu no gradient would ever reach U, b, s or o: g would stay the identity and
        # only the edit rates would train (the reference code uses clamp for this reason).
        return z + (self.scale[layer] * pre + self.shift[layer]).clamp(min=0)


class GradientTransform(nn.Module):
    """g for one weight shape (``d_in`` inputs, ``d_out`` outputs), shared by ``n_layers``
    layers: normalises u and δ online, then maps [u; δ] to [ũ; δ̃] by two residual blocks."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_layers: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.u_norm = RunningMoments(d_in)
        self.delta_norm = RunningMoments(d_out)
        dim = d_in + d_out
        self.blocks = nn.ModuleList([ResidualLowRank(dim, rank, n_layers) for _ in range(2)])

    def forward(self, u: torch.Tensor, delta: torch.Tensor, layer: int,
                update_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """u ``[n, d_in]``, δ ``[n, d_out]`` (nonzero rows only) -> (ũ, δ̃). ``update_stats``
        merges these rows into the running statistics first (training only)."""
        u, delta = u.float(), delta.float()
        if update_stats:
            self.u_norm.update(u)
            self.delta_norm.update(delta)
        z = torch.cat([self.u_norm.normalise(u), self.delta_norm.normalise(delta)], dim=-1)
        for block in self.blocks:
            z = block(z, layer)
        return z[:, : self.d_in], z[:, self.d_in:]


def shape_key(d_in: int, d_out: int) -> str:
    return f"in{d_in}_out{d_out}"


class MendNetworks(nn.Module):
    """Every network MEND trains: one ``GradientTransform`` per weight shape and the learned
    per-matrix edit rates α (one per edited matrix, in ``slots`` order)."""

    def __init__(self, shapes: Sequence[tuple[int, int]], rank: int, edit_lr: float) -> None:
        """``shapes``: (d_in, d_out) of each edited matrix, in a fixed order (the slots)."""
        super().__init__()
        order: dict[str, int] = {}
        self.slots: list[tuple[str, int]] = []  # (network key, layer index within that network)
        for d_in, d_out in shapes:
            key = shape_key(d_in, d_out)
            self.slots.append((key, order.get(key, 0)))
            order[key] = order.get(key, 0) + 1
        dims = {shape_key(i, o): (i, o) for i, o in shapes}
        self.nets = nn.ModuleDict({k: GradientTransform(*dims[k], rank, n)
                                   for k, n in order.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(edit_lr)))

    def transform(self, slot: int, u: torch.Tensor, delta: torch.Tensor,
                  update_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        key, layer = self.slots[slot]
        return self.nets[key](u, delta, layer, update_stats)
