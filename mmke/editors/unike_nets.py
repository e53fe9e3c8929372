"""UniKE's networks and equations (Pan et al., NeurIPS 2024, arXiv 2409.19872; the editor is in
``mmke.editors.unike``).

The paper's equation numbers are not cited: its method section could not be read here (only
its abstract and the digest in EDITORS.md were at hand), so each function names the part of the
method it implements, and what mmke chose where the digest leaves a choice open.

- ``latent_knowledge``: external knowledge as latent in-context key–value pairs. Each edit
  stores (h_sem, h_pos): the self-attention output of a knowledge layer at the question's last
  token, and at the last token of question + new answer. A hidden state h retrieves the top-K
  pairs by the cosine of h and h_sem (``mmke.encoders.retrieve.nearest``) and attends over them:
  h_know = Σ_i softmax_i(h·h_sem,i / √d) h_pos,i.
- ``blend``: the self-attention output becomes α·h + (1 − α)·h_know. In the paper this comes
  from splitting attention over [in-context tokens; input tokens] into the input's share α and
  the in-context share 1 − α, with the in-context part replaced by the latent knowledge.
- ``alpha``: α from the semantic space. The digest writes α = cos(Enc_Sem(h_know), h). Taken
  literally as the weight of h, an unrelated input (cosine near 0) would take the most
  in-context knowledge and a matching one the least, the reverse of what the split above
  means (relevant in-context tokens draw the attention). mmke reads the cosine as the relevance
  r = cos(Enc_Sem(h_know), Enc_Sem(h)) (both sides in the semantic space, so the cosine compares
  like with like) and sets the in-context share to it: 1 − α = relu(r − τ) / (1 − τ), with τ
  (``relevance_threshold``, 0 by default) a floor below which nothing is blended.
- ``semantic_loss`` and ``truthfulness_loss``: the disentangling encoders' contrastive
  objectives on triplets (question, true answer, the model's own wrong answer) from the train
  split: in the semantic space the question and both of its answered states are one meaning
  (InfoNCE against the other questions of the batch); in the truthfulness space true answers
  cluster apart from wrong ones (supervised contrastive).
- ``steering``: truthfulness steers the new neurons' values: ζ′ = W_ζ(mean Tru_pos − mean
  Tru_neg), scaled by β (not given by the paper: ``truth_beta``). W_ζ maps a truthfulness
  direction back to the hidden space; mmke trains it with the encoders, to carry the difference
  of a triplet's truthfulness codes onto the difference of its two answered states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmke.encoders.retrieve import nearest


class MLPEncoder(nn.Module):
    """Enc_Sem or Enc_Tru of one layer ("several MLP layers"): Linear → GELU → Linear → GELU →
    Linear, from the hidden size to ``out_dim``."""

    def __init__(self, hidden: int, width: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, width),
                                 nn.GELU(), nn.Linear(width, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.float())


class UniKENetworks(nn.Module):
    """Per knowledge layer: Enc_Sem, Enc_Tru, W_ζ, and the running mean of Enc_Tru over the
    train split's wrong-answer states (``tru_neg``, the mean Tru_neg of the steering;
    ``tru_neg_count``: how many codes it has seen)."""

    def __init__(self, n_layers: int, hidden: int, width: int, out_dim: int) -> None:
        super().__init__()
        self.enc_sem = nn.ModuleList(MLPEncoder(hidden, width, out_dim) for _ in range(n_layers))
        self.enc_tru = nn.ModuleList(MLPEncoder(hidden, width, out_dim) for _ in range(n_layers))
        self.w_zeta = nn.ModuleList(nn.Linear(out_dim, hidden, bias=False)
                                    for _ in range(n_layers))
        self.register_buffer("tru_neg", torch.zeros(n_layers, out_dim))
        self.register_buffer("tru_neg_count", torch.zeros(n_layers))

    @torch.no_grad()
    def track_negatives(self, j: int, tru_neg: torch.Tensor, momentum: float = 0.9) -> None:
        """Fold a batch of Tru_neg codes of layer slot ``j`` into its running mean (an
        exponential one, as the encoder moves while it trains; the first batch sets it)."""
        mean = tru_neg.float().mean(0)
        if self.tru_neg_count[j] == 0:
            self.tru_neg[j] = mean
        else:
            self.tru_neg[j] = momentum * self.tru_neg[j] + (1 - momentum) * mean
        self.tru_neg_count[j] += len(tru_neg)


def latent_knowledge(h: torch.Tensor, sem: torch.Tensor, pos: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h_know for each row of ``h`` [P, d] from the memory (``sem``, ``pos``: [N, d]): the
    top-min(k, N) pairs by cos(h, h_sem), then softmax(h·h_sem/√d) over them weighing h_pos.
    Returns (h_know [P, d], the retrieved indices [P, k'])."""
    k = min(k, sem.shape[0])
    found = nearest(h, sem, k)
    keys, values = sem[found.indices], pos[found.indices]          # [P, k, d]
    scores = (keys.float() @ h.float().unsqueeze(-1)).squeeze(-1) / math.sqrt(h.shape[-1])
    weights = scores.softmax(dim=-1)
    return (weights.unsqueeze(-1) * values.float()).sum(dim=1), found.indices


def alpha(sem_know: torch.Tensor, sem_h: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """α per row: 1 − relu(r − τ)/(1 − τ) with r = cos(Enc_Sem(h_know), Enc_Sem(h)) (see the
    module docstring for why the cosine sets the in-context share)."""
    r = F.cosine_similarity(sem_know.float(), sem_h.float(), dim=-1)
    return 1.0 - F.relu(r - threshold) / (1.0 - threshold)


def blend(h: torch.Tensor, h_know: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """α·h + (1 − α)·h_know, α per row ([...]) of h ([..., d])."""
    a = a.unsqueeze(-1)
    return a * h + (1.0 - a) * h_know


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """−mean_i log softmax_j(cos(a_i, p_j)/t)_i: row i's positive against the others'."""
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


def semantic_loss(sem_q: torch.Tensor, sem_pos: torch.Tensor, sem_neg: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """The semantic space: a question's state, its true-answer state and its wrong-answer state
    are one meaning. InfoNCE from the question to each answered state and between the two,
    against the other triplets of the batch ([B, d_s] each)."""
    return (info_nce(sem_q, sem_pos, temperature) + info_nce(sem_q, sem_neg, temperature)
            + info_nce(sem_pos, sem_neg, temperature)) / 3


def truthfulness_loss(tru_pos: torch.Tensor, tru_neg: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """The truthfulness space (supervised contrastive): each code's positives are the other
    codes of its own kind (true or wrong), its negatives the codes of the other kind."""
    codes = F.normalize(torch.cat([tru_pos, tru_neg]), dim=-1)      # [2B, d_s]
    truth = torch.cat([torch.ones(len(tru_pos)), torch.zeros(len(tru_neg))]).to(codes.device)
    logits = codes @ codes.T / temperature
    eye = torch.eye(len(codes), dtype=torch.bool, device=codes.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits.log_softmax(dim=1)
    same = (truth[:, None] == truth[None, :]) & ~eye
    return -(log_prob.masked_fill(~same, 0.0).sum(1) / same.sum(1).clamp_min(1)).mean()


def direction_loss(w_zeta: nn.Linear, tru_pos: torch.Tensor, tru_neg: torch.Tensor,
                   h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """W_ζ's objective: W_ζ(Tru_pos − Tru_neg) ≈ h_pos − h_neg, relative squared error."""
    target = (h_pos - h_neg).float()
    error = w_zeta(tru_pos - tru_neg) - target
    return error.pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp_min(1e-8)


def steering(w_zeta: nn.Linear, tru_pos: torch.Tensor, tru_neg_mean: torch.Tensor,
             beta: float) -> torch.Tensor:
    """β·ζ′ with ζ′ = W_ζ(mean Tru_pos − mean Tru_neg): ``tru_pos`` [n, d_s] the truthfulness
    codes of the retrieved true-answer states, ``tru_neg_mean`` [d_s]. Returns [hidden]."""
    return beta * w_zeta(tru_pos.float().mean(0) - tru_neg_mean.float())
