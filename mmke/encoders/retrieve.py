"""Cosine top-k over an embedding bank: ASAM's SimCSE-style variants, IKE's demonstrations, and
SERAC's nearest edit all pick neighbours this one way."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from mmke.errors import ConfigError

Exclude = torch.Tensor | Sequence[Iterable[int]] | None


class Neighbours(NamedTuple):
    """``indices[i, j]``: the bank row that is query i's j-th nearest; ``scores``: its cosine."""

    indices: torch.Tensor  # [n_queries, k] long
    scores: torch.Tensor  # [n_queries, k] float


def _exclusion_mask(exclude: Exclude, n_queries: int, n_bank: int,
                    device: torch.device) -> torch.Tensor | None:
    """``exclude`` as a bool ``[n_queries, n_bank]`` mask (True = never pick)."""
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        if exclude.dtype != torch.bool or tuple(exclude.shape) != (n_queries, n_bank):
            raise ValueError(f"an exclude mask must be bool of shape {(n_queries, n_bank)}, got "
                             f"{exclude.dtype} {tuple(exclude.shape)}")
        return exclude.to(device)
    if len(exclude) != n_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {n_queries} queries")
    mask = torch.zeros(n_queries, n_bank, dtype=torch.bool)
    for row, indices in enumerate(exclude):
        picked = [int(i) for i in indices]
        if any(not 0 <= i < n_bank for i in picked):
            raise IndexError(f"exclude[{row}] has an index outside the bank of {n_bank}")
        mask[row, picked] = True
    return mask.to(device)


def nearest(query_embeddings: torch.Tensor, bank_embeddings: torch.Tensor, k: int,
            exclude: Exclude = None) -> Neighbours:
    """The ``k`` bank rows most cosine-similar to each query, most similar first.

    Args:
        query_embeddings: ``[n_queries, d]`` (or ``[d]`` for one query).
        bank_embeddings: ``[n_bank, d]``; need not be normalised (cosine normalises both).
        k: neighbours per query; more than a query has left after ``exclude`` is a ConfigError.
        exclude: bank rows a query may not pick (e.g. the edit's own record): a bool mask
            ``[n_queries, n_bank]``, or one iterable of bank indices per query.

    Equal scores are ordered by bank index (lower first), so the result is a function of the
    inputs alone. Computed on the bank's device; returned there.
    """
    if k < 0:
        raise ConfigError(f"k={k} neighbours: k must be non-negative")
    queries = query_embeddings.unsqueeze(0) if query_embeddings.dim() == 1 else query_embeddings
    if (queries.dim() != 2 or bank_embeddings.dim() != 2
            or queries.shape[1] != bank_embeddings.shape[1]):
        raise ValueError(f"queries {tuple(query_embeddings.shape)} and bank "
                         f"{tuple(bank_embeddings.shape)} must be [n, d] with the same d")
    n_queries, n_bank = queries.shape[0], bank_embeddings.shape[0]
    device = bank_embeddings.device
    bank = torch.nn.functional.normalize(bank_embeddings.float(), dim=1)
    queries = torch.nn.functional.normalize(queries.to(device).float(), dim=1)
    scores = queries @ bank.T
    mask = _exclusion_mask(exclude, n_queries, n_bank, device)
    if mask is not None:
        available = n_bank - int(mask.sum(dim=1).max()) if n_queries else n_bank
        scores = scores.masked_fill(mask, float("-inf"))
    else:
        available = n_bank
    if k > available:
        raise ConfigError(f"k={k} neighbours asked, but the bank has only {available} rows left "
                          f"for some query (bank of {n_bank}, after exclusions)")
    # A stable descending sort keeps equal scores in index order; topk makes no such promise.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return Neighbours(indices=order, scores=torch.gather(scores, 1, order))
