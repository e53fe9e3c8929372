"""Metric definitions on tensors, named exactly as the papers use them.

Accuracy family (Reliability, T-Gen, M-Gen), teacher-forced on the target tokens:
- ``token_accuracy``: share of target tokens whose argmax is the target token (MMEdit/EasyEdit).
- ``exact_match``: 1 if every target token is the argmax, else 0.

Locality family (T-Loc, M-Loc), post-edit against a reference (the pre-edit model, or the previous
step in an online stream), at the same positions of the same input:
- ``topk_agreement``: MMEdit style; ordered agreement of the top-k token ids (EasyEdit: k=1 for
  text, k=10 for multimodal), averaged over positions and ranks.
- ``exp_neg_kl``: M-ORE style, Eq. (4)/(17)-(18): mean over positions of exp(-KL(p_post || p_ref)).
"""

from __future__ import annotations

import torch


def target_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per target token, whether it is the argmax: ``logits`` [n, V] at the positions that
    predict ``targets`` [n] (teacher forcing)."""
    return logits.argmax(-1) == targets


def token_accuracy(correct: torch.Tensor) -> float:
    """Share of target tokens predicted correctly, from ``target_correct``."""
    if correct.numel() == 0:
        raise ValueError("no target tokens to score")
    return correct.float().mean().item()


def exact_match(correct: torch.Tensor) -> float:
    """1.0 when every target token is predicted correctly, else 0.0."""
    if correct.numel() == 0:
        raise ValueError("no target tokens to score")
    return float(bool(correct.all()))


def topk_agreement(post_topk: torch.Tensor, ref_topk: torch.Tensor) -> float:
    """Ordered agreement of top-k ids, both [n_positions, k]: mean of elementwise equality."""
    if post_topk.shape != ref_topk.shape:
        raise ValueError(f"top-k shapes differ: {tuple(post_topk.shape)} vs {tuple(ref_topk.shape)}")
    return (post_topk == ref_topk).float().mean().item()


def kl_divergence(post_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p_post || p_ref) per position, from log-probabilities [n, V]."""
    post = post_logprobs.float()
    return (post.exp() * (post - ref_logprobs.float())).sum(-1)


def exp_neg_kl(post_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> float:
    """Mean over positions of exp(-KL(p_post || p_ref)); 1 means no change at all."""
    if post_logprobs.shape != ref_logprobs.shape:
        raise ValueError("post and reference distributions have different shapes")
    return torch.exp(-kl_divergence(post_logprobs, ref_logprobs).clamp_min(0)).mean().item()
