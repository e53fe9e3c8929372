"""M-ORE's low-rank write interface on one linear module (M-ORE §4.2-4.3).

W̃ = W + (α/r)·B·A (Eq. 7): A ∈ R^{r×d_in} with orthonormal rows (Eq. 8, ``orthogonal_``), frozen;
B ∈ R^{d_out×r} starts at zero. The write is a forward hook that adds (α/r)·(x·Aᵀ)·Bᵀ to the
module's output, so the module's own weight never changes and removing the hook restores it.

The steady-space statistic S_t = λI + Σ z̄ z̄ᵀ (Eq. 10) is kept only as its preconditioner
P_t = (I + S_t)⁻¹, updated by the Sherman-Morrison rank-one recursion (Eq. 13) in O(r²); nothing
is stored per edit. ``no_pooling`` (M-ORE Table 3) keeps S itself, adds every position's z zᵀ
and inverts (I + S) directly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def sherman_morrison(P: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Eq. 13: (P⁻¹ + z zᵀ)⁻¹ = P − P z zᵀ P / (1 + zᵀ P z), for symmetric P."""
    Pz = P @ z
    return P - torch.outer(Pz, Pz) / (1.0 + z @ Pz)


class LowRankWrite:
    """The B·A write on ``module`` (an ``nn.Linear``) with its preconditioner.

    ``eta``, ``lam``: step size and λ of this module (language and projector differ);
    ``scale``: α/r; ``pooled``: the rank-one sketch z̄ (True) or every position (False).
    P is kept in float64: it is r×r, and the recursion runs over thousands of edits.
    """

    def __init__(self, module: nn.Linear, rank: int, scale: float, eta: float, lam: float,
                 generator: torch.Generator, pooled: bool = True) -> None:
        weight = module.weight
        d_out, d_in = weight.shape
        if not 1 <= rank <= d_in:
            raise ValueError(f"rank {rank} must be between 1 and the module's input size {d_in} "
                             "(A needs orthonormal rows)")
        self.module, self.rank, self.scale = module, rank, scale
        self.eta, self.lam, self.pooled = eta, lam, pooled
        A = torch.empty(rank, d_in, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            nn.init.orthogonal_(A)
        self.A = A.to(weight.device)
        self.B = torch.zeros(d_out, rank, dtype=torch.float32, device=weight.device)
        eye = torch.eye(rank, dtype=torch.float64, device=weight.device)
        self.P = eye / (1.0 + lam)  # (I + λI)⁻¹: S_0 = λI (Eq. 10)
        self.S = lam * eye if not pooled else None
        self.keys: list[torch.Tensor] = []  # inputs seen while capturing (one forward)
        self.capturing = False
        self.active = False  # whether the hook adds B·A (False until the first write)
        self._handle: RemovableHandle | None = None

    # --- the forward ----------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0]
        if self.capturing:
            self.keys.append(x)
        if not self.active:
            return None
        low = nn.functional.linear(nn.functional.linear(x.to(self.A.dtype), self.A), self.B)
        return output + (self.scale * low).to(output.dtype)

    def hook_on(self) -> None:
        """Install the forward hook (once); until the first write it adds nothing."""
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # --- one edit --------------------------------------------------------------------------

    def observe(self, keys: torch.Tensor) -> None:
        """Add the step context's keys [n, d_in] to the statistic: their mean z̄ = A·mean(k)
        (Eq. 9-10, Eq. 13), or every z zᵀ under ``no_pooling``."""
        z = keys.detach().to(self.A.dtype) @ self.A.detach().T  # [n, r]
        if self.pooled:
            self.P = sherman_morrison(self.P, z.mean(0).to(self.P.dtype))
            return
        assert self.S is not None
        zz = z.to(self.S.dtype)
        self.S = self.S + zz.T @ zz
        eye = torch.eye(self.rank, dtype=self.S.dtype, device=self.S.device)
        self.P = torch.linalg.inv(eye + self.S)

    def write(self, grad_B: torch.Tensor) -> None:
        """Eq. 12: B ← B − η·G·P."""
        self.B = self.B - self.eta * (grad_B.to(self.P.dtype) @ self.P).to(self.B.dtype)
        self.active = True

    def move_basis(self, grad_A: torch.Tensor) -> None:
        """``no_freeze`` (M-ORE Table 3): A takes a plain gradient step too, so the write
        coordinates drift and lose their orthonormality."""
        self.A = self.A - self.eta * grad_A.to(self.A.dtype)
