"""LiveEdit's networks (Chen et al., CVPR 2025, §3): the expert generator, the routing-feature
extractors and the low-rank mixture that edits a layer's output. Batched with padding masks, so
one forward routes every row of an evaluation batch.

Shapes: ``reps`` [b, L, d] are a decoder layer's outputs, ``mask`` [b, L] marks the positions a
feature reads; ``module_dim`` (the paper's d_m) is the width of the routing features, ``eqe_n``
the number of learned queries, ``rank`` the experts' rank r.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MaskedCrossAttention(nn.Module):
    """Multi-head attention of learned or given queries over masked keys. A row whose mask is
    empty reads nothing: its output is zero (not NaN), and the caller routes it nowhere."""

    def __init__(self, query_dim: int, key_dim: int, qk_dim: int, value_dim: int, heads: int
                 ) -> None:
        super().__init__()
        if qk_dim % heads or value_dim % heads:
            raise ValueError(f"widths {qk_dim}/{value_dim} must divide into {heads} heads")
        self.heads = heads
        self.q = nn.Linear(query_dim, qk_dim)
        self.k = nn.Linear(key_dim, qk_dim)
        self.v = nn.Linear(key_dim, value_dim)
        self.scale = 1 / math.sqrt(qk_dim // heads)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        """queries [b|1, n, dq], keys [b, L, dk], mask [b, L] -> [b, n, value_dim]."""
        b, length, _ = keys.shape
        h = self.heads
        q = self.q(queries).expand(b, -1, -1)
        q = q.reshape(b, q.shape[1], h, -1)
        k = self.k(keys).reshape(b, length, h, -1)
        v = self.v(keys).reshape(b, length, h, -1)
        scores = torch.einsum("bnhd,blhd->bnlh", q, k) * self.scale
        scores = scores.masked_fill(~mask[:, None, :, None], float("-inf"))
        weights = torch.softmax(scores, dim=2).nan_to_num(0.0)  # an empty row: all -inf
        return torch.einsum("bnlh,blhd->bnhd", weights, v).reshape(b, q.shape[1], -1)


class RoutingFeatures(nn.Module):
    """The paper's feature extractor f_fe: a textual feature of the question (learned queries
    over its tokens) and a visual feature read from the picture by queries conditioned on the
    question (text first, then vision). The input-side extractor also holds the learned
    prototype picture (the "vision sentinel") that hard routing compares against."""

    def __init__(self, hidden: int, module_dim: int, heads: int, eqe_n: int,
                 prototype_tokens: int = 0) -> None:
        super().__init__()
        self.norm_vision = nn.LayerNorm(hidden)
        self.vision_queries = nn.Parameter(torch.empty(1, eqe_n, module_dim))
        self.question_for_vision = MaskedCrossAttention(module_dim, hidden, module_dim,
                                                        module_dim, heads)
        self.vision = MaskedCrossAttention(module_dim, hidden, module_dim, module_dim, heads)
        self.norm_text = nn.LayerNorm(hidden)
        self.text_queries = nn.Parameter(torch.empty(1, eqe_n, module_dim))
        self.text = MaskedCrossAttention(module_dim, hidden, module_dim, module_dim, heads)
        self.prototype = (nn.Parameter(torch.empty(1, prototype_tokens, hidden))
                          if prototype_tokens else None)
        nn.init.kaiming_normal_(self.vision_queries)
        nn.init.kaiming_normal_(self.text_queries)
        if self.prototype is not None:
            nn.init.kaiming_normal_(self.prototype)

    def visual(self, reps: torch.Tensor, question: torch.Tensor, vision: torch.Tensor
               ) -> torch.Tensor:
        """[b, eqe_n, module_dim]: the question's queries read the picture's positions."""
        normed = self.norm_vision(reps)
        asked = self.question_for_vision(self.vision_queries, normed, question)
        return self.vision(asked, normed, vision)

    def textual(self, reps: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """[b, eqe_n, module_dim]: learned queries over the question's positions."""
        return self.text(self.text_queries, self.norm_text(reps), question)

    def prototype_visual(self, reps: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """The visual feature the question reads from the learned prototype picture."""
        assert self.prototype is not None
        normed = self.norm_vision(reps)
        asked = self.question_for_vision(self.vision_queries, normed, question)
        proto = self.norm_vision(self.prototype).expand(reps.shape[0], -1, -1)
        everywhere = torch.ones(proto.shape[:2], dtype=torch.bool, device=proto.device)
        return self.vision(asked, proto, everywhere)


class ExpertGenerator(nn.Module):
    """f_eg: ``rank`` learned queries cross-attend the edit's layer states (picture, question and
    answer, teacher-forced) and give one factor of a rank-``rank`` expert, [b, rank, hidden],
    scaled by 1 / (lora_scale·sqrt(rank)) (the authors' scale; 0.1 at their rank 4, scale 5)."""

    def __init__(self, hidden: int, module_dim: int, heads: int, rank: int, lora_scale: float
                 ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.queries = nn.Parameter(torch.empty(1, rank, module_dim))
        self.attend = MaskedCrossAttention(module_dim, hidden, module_dim, hidden, heads)
        self.scale = 1 / (lora_scale * math.sqrt(rank))
        nn.init.kaiming_normal_(self.queries)

    def forward(self, reps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attend(self.queries, self.norm(reps), mask) * self.scale


class LiveEditNetworks(nn.Module):
    """Everything LiveEdit trains; the backbone stays frozen."""

    def __init__(self, hidden: int, module_dim: int, heads: int, eqe_n: int, rank: int,
                 lora_scale: float, prototype_tokens: int) -> None:
        super().__init__()
        self.edit_features = RoutingFeatures(hidden, module_dim, heads, eqe_n)
        self.input_features = RoutingFeatures(hidden, module_dim, heads, eqe_n, prototype_tokens)
        self.expert_in = ExpertGenerator(hidden, module_dim, heads, rank, lora_scale)
        self.expert_out = ExpertGenerator(hidden, module_dim, heads, rank, lora_scale)
        self.input_norm = nn.LayerNorm(hidden)
        self.sim_scale = 1 / math.sqrt(module_dim)

    def similarity(self, inputs: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """Mean over the learned queries of scaled dot products: [b, e, m] x [n, e, m] -> [b, n]."""
        return torch.einsum("bem,nem->bne", inputs, edits).mean(2) * self.sim_scale

    def residual(self, reps: torch.Tensor, experts_in: torch.Tensor, experts_out: torch.Tensor,
                 coefficients: torch.Tensor) -> torch.Tensor:
        """Δh = Σ_m c_m · ReLU(LN(h) C_mᵀ) R_m at every position (§3.3, the fused low-rank
        experts). reps [b, L, d], experts [n, r, d], coefficients [b, n] -> [b, L, d]."""
        x = torch.relu(torch.einsum("bld,nrd->blnr", self.input_norm(reps), experts_in))
        return torch.einsum("blnr,nrd,bn->bld", x, experts_out, coefficients)


def soft_coefficients(similarity: torch.Tensor, allowed: torch.Tensor,
                      split: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Soft routing (§3.3): c = softmax(s) · sigmoid(s) over the experts a row may use (the ones
    hard routing kept); zero elsewhere, and zero for a row that may use none."""
    relative = torch.softmax(similarity.masked_fill(~allowed, float("-inf")), dim=1)
    relative = relative.nan_to_num(0.0)
    absolute = torch.sigmoid(similarity)
    if split:
        return relative, absolute
    return relative * absolute * allowed


EPS = 1e-8  # inside the routing losses' logs, as the authors


def soft_routing_loss(similarity: torch.Tensor) -> torch.Tensor:
    """Row i's input should route to edit i: −log softmax(s_i)_i, plus −log σ(s_ii) for the
    positive and −log(1 − σ(s_i,i−1)) for one negative (the next row's edit)."""
    everyone = torch.ones_like(similarity, dtype=torch.bool)
    relative, absolute = soft_coefficients(similarity, everyone, split=True)
    positive, negative = torch.diag(absolute), torch.diag(absolute.roll(1, 1))
    return (-torch.log(torch.diag(relative) + EPS).mean()
            - (torch.log(positive + EPS) + torch.log(1 - negative + EPS)).mean())


def hard_routing_scores(similarity: torch.Tensor, sentinel: torch.Tensor) -> torch.Tensor:
    """softmax over [row i's visual similarity to each edit; to the prototype], [b, b + 1]."""
    return torch.softmax(torch.cat([similarity, sentinel], dim=1), dim=1)


def neighbour_loss(similarity: torch.Tensor, sentinel: torch.Tensor) -> torch.Tensor:
    """Hard routing, in scope: row i's input should prefer edit i to every other and to the
    prototype."""
    return -torch.log(torch.diag(hard_routing_scores(similarity, sentinel)) + EPS).mean()


def prototype_loss(similarity: torch.Tensor, sentinel: torch.Tensor) -> torch.Tensor:
    """Hard routing, out of scope: an input unrelated to every edit should prefer the
    prototype."""
    return -torch.log(hard_routing_scores(similarity, sentinel)[:, -1] + EPS).mean()
