"""Metric definitions on tensors, named exactly as the papers use them.

Accuracy family (Reliability, T-Gen, M-Gen), teacher-forced on the target tokens:
- ``token_accuracy``: share of target tokens whose argmax is the target token (MMEdit/EasyEdit).
- ``exact_match``: 1 if every target token is the argmax, else 0.

Locality family (T-Loc, M-Loc), post-edit against a reference (the pre-edit model, or the previous
step in an online stream), at the same positions of the same input:
- ``topk_agreement``: MMEdit style; ordered agreement of the top-k token ids (EasyEdit: k=1 for
  text, k=10 for multimodal), averaged over positions and ranks.
- ``align_right``: EasyEdit's alignment of pre- and post-edit outputs of different lengths (a
  prompt editor such as IKE lengthens the post-edit prompt): both keep their last n positions.
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


def align_right(post: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both cut to their last ``min`` positions along dim 0, as EasyEdit compares locality outputs
    (``post_logits[:, -base_logits.shape[1]:]`` or the reverse); a no-op for equal lengths."""
    n = min(post.shape[0], ref.shape[0])
    return post[post.shape[0] - n:], ref[ref.shape[0] - n:]


def kl_divergence(post_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p_post || p_ref) per position, from log-probabilities [n, V]."""
    post = post_logprobs.float()
    return (post.exp() * (post - ref_logprobs.float())).sum(-1)


def exp_neg_kl(post_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> float:
    """Mean over positions of exp(-KL(p_post || p_ref)); 1 means no change at all."""
    if post_logprobs.shape != ref_logprobs.shape:
        raise ValueError("post and reference distributions have different shapes")
    return torch.exp(-kl_divergence(post_logprobs, ref_logprobs).clamp_min(0)).mean().item()
