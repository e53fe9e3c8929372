"""ODEdit's locality risk (Su et al., Eq. 3): R_loc = KL(p_φe(·|m_t, x_t) ‖ p_φ(·|m_t, x_t)).

Direction: the *post-edit* distribution p_φe is the first argument, so the expectation is under the
edited model, Σ_v p_post(v) [log p_post(v) − log p_pre(v)] (the reverse, mode-seeking KL). This is
the opposite of EasyEdit/MEND's locality term, which is KL(p_pre ‖ p_post); ODEdit writes
KL(p_φe ‖ p_φ) and we follow the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True (all positions if None)."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != positions {tuple(values.shape)}")
    weight = mask.to(values.dtype)
    count = weight.sum()
    # An empty selection contributes nothing rather than NaN; keep the graph so callers can add it.
    return (values * weight).sum() / count.clamp_min(1.0)


def kl_post_pre_logprobs(post_logprobs: torch.Tensor, pre_logprobs: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3 from log-probabilities shaped (..., V): KL(p_post ‖ p_pre) per position, mean over
    the positions selected by ``mask`` (shape (...)).

    p_pre belongs to the unedited model φ, a constant of the edit: it is detached so no gradient
    reaches whatever produced it.
    """
    if post_logprobs.shape != pre_logprobs.shape:
        raise ValueError(f"post {tuple(post_logprobs.shape)} vs pre {tuple(pre_logprobs.shape)}")
    post = post_logprobs.float()
    pre = pre_logprobs.detach().float()
    # Σ_v p_post (log p_post − log p_pre); exp(post) is p_post, the measure of the first argument.
    per_position = (post.exp() * (post - pre)).sum(dim=-1)
    return _masked_mean(per_position, mask)


def locality_kl(post_logits: torch.Tensor, pre_logits: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3 from logits shaped (..., V): R_loc = mean over masked positions of
    KL(softmax(post) ‖ softmax(pre)). Softmax in float32 so bf16 backbones stay stable."""
    return kl_post_pre_logprobs(F.log_softmax(post_logits.float(), dim=-1),
                                F.log_softmax(pre_logits.float(), dim=-1), mask)
