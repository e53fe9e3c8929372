"""MEND's gradient factors and the edited forward, on any backbone (roles, never paths).

- ``gradient_factors``: one forward of a batch with a zero "probe" added to the output of each
  edited linear layer; the gradient of the loss w.r.t. a probe is δ (the gradient w.r.t. that
  layer's output), and the layer's input is u. Then ∇_W L = Σ_p δ_p u_pᵀ exactly, summed over
  every row and position. No backbone parameter needs ``requires_grad`` and no weight gradient
  is formed. Rows of the batch are independent, so with a loss that is a sum of per-row losses,
  the factors of row b are those of row b's loss alone: one forward gives every record's factors.
- ``LowRankDelta``: while active, each edited linear layer's output gets − α x Σ_p ũ_p δ̃_pᵀ,
  i.e. the layer computes with W̃ = W − α Σ_p δ̃_p ũ_pᵀ, differentiably in the pseudo-factors
  (so training back-propagates through the applied update into the editor networks) and without
  forming W̃. Each batch row may carry its own edit (``row_edit``): a whole training batch of
  independent edits goes through one forward. The backbone's weights are never written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mmke.backbones.base import Backbone, ForwardOutput, ModelBatch


@dataclass
class Factors:
    """Input u ``[rows, seq, d_in]`` and output gradient δ ``[rows, seq, d_out]`` of one linear
    layer, per batch row and position."""

    u: torch.Tensor
    delta: torch.Tensor

    def rows(self, which: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (u, δ) pairs of batch rows ``which`` (all when None), flattened, keeping only the
        positions where both are nonzero: padding and positions after the last target carry no
        gradient (δ = 0) and would only dilute the normalisation statistics."""
        u, delta = (self.u, self.delta) if which is None else (self.u[list(which)],
                                                               self.delta[list(which)])
        u, delta = u.reshape(-1, u.shape[-1]), delta.reshape(-1, delta.shape[-1])
        keep = (u != 0).any(dim=-1) & (delta != 0).any(dim=-1)
        return u[keep], delta[keep]


def gradient_factors(backbone: Backbone, batch: ModelBatch, modules: Sequence[nn.Linear],
                     loss_fn: Callable[[ModelBatch, ForwardOutput], torch.Tensor]
                     ) -> list[Factors]:
    """u and δ of each of ``modules`` for the loss ``loss_fn(batch, forward output)``."""
    rows, seq = batch.input_ids.shape
    inputs: dict[int, torch.Tensor] = {}
    probes: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def add_probe(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            inputs[index] = args[0].detach()
            probe = torch.zeros_like(output, requires_grad=True)
            probes[index] = probe
            return output + probe
        return add_probe

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            loss = loss_fn(batch, backbone.forward(batch))
            missing = [i for i in range(len(modules)) if i not in probes]
            if missing:
                raise RuntimeError(f"edited modules {missing} did not run in the forward")
            grads = torch.autograd.grad(loss, [probes[i] for i in range(len(modules))],
                                        allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for i, grad in enumerate(grads):
        u = inputs[i]
        delta = torch.zeros_like(probes[i]) if grad is None else grad
        # OPT flattens [rows, seq] before its FFN; every family gets [rows, seq, d]
        out.append(Factors(u.reshape(rows, seq, u.shape[-1]).detach(),
                           delta.reshape(rows, seq, delta.shape[-1]).detach()))
    return out


def row_sum_nll(backbone: Backbone):
    """The edit loss whose factors MEND reads: each row's mean target NLL, summed over rows (so
    row b's factors are those of its own edit, whatever else is in the batch)."""
    def loss(batch: ModelBatch, out: ForwardOutput) -> torch.Tensor:
        return backbone.nll(batch, out, reduction="none").sum()
    return loss


def pad_edits(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-factors of several edits of one layer, zero-padded to the longest:
    (ũ ``[edits, P, d_in]``, δ̃ ``[edits, P, d_out]``); zero rows add nothing to any update."""
    longest = max(1, max(u.shape[0] for u, _ in pairs))
    us, ds = [], []
    for u, d in pairs:
        pad = longest - u.shape[0]
        us.append(nn.functional.pad(u, (0, 0, 0, pad)))
        ds.append(nn.functional.pad(d, (0, 0, 0, pad)))
    return torch.stack(us), torch.stack(ds)


@contextmanager
def low_rank_delta(modules: Sequence[nn.Linear],
                   factors: Sequence[tuple[torch.Tensor, torch.Tensor]], rates: torch.Tensor,
                   row_edit: torch.Tensor | None = None) -> Iterator[None]:
    """Forwards inside compute each of ``modules`` with W̃ = W − rate · δ̃ᵀ ũ.

    ``factors[i]`` = (ũ ``[edits, P, d_in]``, δ̃ ``[edits, P, d_out]``) for ``modules[i]``
    (``pad_edits``); ``rates[i]`` its α. ``row_edit`` (``[rows]``) says which edit each batch row
    carries; None: one edit (``edits`` = 1) for every row of every forward (a regularizer's own
    forwards of other batches)."""

    def hook(index: int):
        u_all, d_all = factors[index]

        def edited(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].float()
            if row_edit is None:
                update = (x @ u_all[0].T) @ d_all[0]
            else:
                x3 = x.reshape(row_edit.shape[0], -1, x.shape[-1])
                update = torch.bmm(torch.bmm(x3, u_all[row_edit].transpose(1, 2)), d_all[row_edit])
            return output - (rates[index] * update).reshape(output.shape).to(output.dtype)
        return edited

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
