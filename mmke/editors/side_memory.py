"""WISE's side memories of one FFN output matrix, the activation router, and TIES merging.

Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language
Models" (NeurIPS 2024), §2.3 (equation numbers are not cited: the paper's text could not be
checked here; each equation is written out instead).

The FFN of the edited layer is FFN(x) = A(x)·W_vᵀ (+ b), with A(x) the input of its output matrix
W_v (role ``ffn_out``: OPT ``fc2``, Llama ``down_proj``). A side memory W_v' is a copy of W_v; the
main memory W_v stays frozen. Since W_v'·A + b = W_v·A + b + (W_v' − W_v)·A, a forward hook on the
output matrix adds A(x)·(W_v' − W_v)ᵀ to the module's output for the rows routed to that memory:
the backbone's weights are never touched.

Routing (§2.3.1): the activation score of memory m on an input x is
  Δ_act(x) = ‖A(x)·(W_v'^m − W_v)ᵀ‖₂,
taken per token and averaged over the input's attended tokens (EasyEdit's ``euc`` takes the mean
over tokens; it also passes both outputs through the FFN's activation function, which the paper
does not, so we follow the paper). An input whose score is below every memory's threshold ε_m
goes through the main memory; otherwise through the memory with the largest score.

A forward pre-hook on the decoder reads each call's attention mask (all tokens when generation
leaves it out), so the router knows every row's attended tokens in teacher-forced scoring, in
generation and in a regularizer's own forwards alike. In KV-cached generation the first call
holds the whole prompt; the later calls (tokens already in the cache) add one token per row and
keep the prompt's decision, as GRACE's decoding steps do. So a generated answer is routed on its
prompt, a teacher-forced one on prompt and target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SideMemory:
    """One side memory W_v' (float32 copy of the output matrix) and what routing needs of it.

    ``min_act``: the smallest Δ_act of the edits written into it (the threshold is ``act_ratio``
    times that); ``mask``: the shard's random gradient mask (None once closed or merged);
    ``n_edits``: edits written into it."""

    weight: nn.Parameter
    mask: torch.Tensor | None = None
    min_act: float = float("inf")
    n_edits: int = 0

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """W_v' − W_v, float32 (differentiable in W_v')."""
        return self.weight - base.detach().float()


def activation_scores(keys: torch.Tensor, delta: torch.Tensor,
                      attended: torch.Tensor) -> torch.Tensor:
    """Δ_act per row: the mean over attended tokens of ‖A_t·Δᵀ‖₂. ``keys`` [rows, seq, d_ff],
    ``delta`` [d_out, d_ff], ``attended`` [rows, seq] bool. Float32, differentiable in ``delta``."""
    norms = F.linear(keys.float(), delta).norm(dim=-1)                  # [rows, seq]
    weights = attended.to(norms.dtype)
    return (norms * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def random_mask(shape: torch.Size, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A knowledge shard (§2.3.2): each entry trainable with probability ``ratio``, float 0/1."""
    return (torch.rand(shape, generator=generator) < ratio).float()


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al., NeurIPS 2023), as WISE merges its shards (§2.3.2):
    W = W_v + TIES({W_i − W_v}). Per task vector τ_i = W_i − W_v: trim to the ``density`` share
    of its entries largest in magnitude; elect each entry's sign as the sign of the sum of the
    trimmed τ_i (ties to +); average, per entry, only the τ_i that agree with the elected sign
    (disjoint mean; an entry no τ_i agrees on stays at W_v)."""
    if not tensors:
        return base.clone()
    taus = torch.stack([trim(t.float() - base.float(), density) for t in tensors])
    elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (torch.sign(taus) == elected).float()
    merged = (taus * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1.0)
    return (base.float() + merged).to(base.dtype)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``density`` share of largest-magnitude entries set to zero."""
    if density >= 1.0:
        return tau
    k = max(1, int(density * tau.numel()))
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().reshape(-1).topk(k).indices] = True
    return tau * keep.reshape(tau.shape)


@dataclass
class _Call:
    """The decoder call in progress: which of its tokens are attended, whether it continues a
    KV-cached prompt, and each row's routing decision."""

    #: [rows, tokens of this call] bool
    attended: torch.Tensor | None = None
    continuation: bool = False
    #: per row: index into the routed memories, −1 for the main memory
    route: torch.Tensor | None = None
    routed: list[SideMemory] = field(default_factory=list)


def _call_tokens(kwargs: dict) -> torch.Tensor:
    """The tokens a decoder call was given (embeddings on a prompt, ids on a decoding step)."""
    for name in ("inputs_embeds", "input_ids"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    raise RuntimeError("WISE's router found neither inputs_embeds nor input_ids in the "
                       "decoder's call")


def _cached_length(kwargs: dict) -> int:
    """Tokens already in the call's KV cache (0 for a forward without one)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


class MemoryRouter:
    """The hooks that put side memories beside one FFN output matrix.

    ``memories()`` is asked at every forward for the memories to route among and their
    thresholds. ``force`` (while an edit trains) sends every row through that memory, as
    EasyEdit's adapter does in editing mode. ``scores`` records the last routing scores."""

    def __init__(self, decoder: nn.Module, ffn_out: nn.Linear) -> None:
        self.decoder, self.ffn_out = decoder, ffn_out
        self.force: SideMemory | None = None
        self.candidates: list[tuple[SideMemory, float]] = []
        self.last_scores: torch.Tensor | None = None
        self._call = _Call()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if not self._handles:
            self._handles = [
                self.decoder.register_forward_pre_hook(self._read_mask, with_kwargs=True),
                self.ffn_out.register_forward_hook(self._write)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._call = _Call()
        self.force, self.candidates, self.last_scores = None, [], None

    def _read_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Which tokens of this call are attended. Generation leaves the mask out when no row
        is padded; a decoding step's mask covers the cache too, so only its tail is this call's."""
        tokens = _call_tokens(kwargs)
        rows, seq = tokens.shape[:2]
        mask = kwargs.get("attention_mask")
        attended = (torch.ones(rows, seq, dtype=torch.bool, device=tokens.device)
                    if mask is None else mask[:, -seq:].bool())
        self._call.attended = attended
        self._call.continuation = _cached_length(kwargs) > 0

    def _write(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        attended = self._call.attended
        if attended is None:
            raise RuntimeError("WISE's router reads the attention mask of the decoder's call; "
                               "the FFN ran outside a decoder forward")
        rows = attended.shape[0]
        keys = args[0].reshape(rows, -1, args[0].shape[-1])      # OPT flattens [batch, seq]
        if self.force is not None:
            extra = F.linear(keys.float(), self.force.delta(self.ffn_out.weight))
            return output + extra.reshape(output.shape).to(output.dtype)
        if not self._call.continuation:
            self._route(keys, attended)
        elif self._call.route is None or len(self._call.route) != rows:
            raise RuntimeError("a KV-cached step of WISE's router came without its prompt's call")
        return self._apply(keys, output)

    @torch.no_grad()
    def _route(self, keys: torch.Tensor, attended: torch.Tensor) -> None:
        """Each row's memory: the one with the largest Δ_act among those above their threshold,
        else the main memory (−1)."""
        rows = keys.shape[0]
        routed = [m for m, _ in self.candidates]
        route = torch.full((rows,), -1, dtype=torch.long, device=keys.device)
        if routed:
            base = self.ffn_out.weight
            scores = torch.stack([activation_scores(keys, m.delta(base), attended)
                                  for m in routed])                        # [memories, rows]
            thresholds = scores.new_tensor([eps for _, eps in self.candidates])[:, None]
            above = scores > thresholds
            best = scores.masked_fill(~above, float("-inf")).argmax(dim=0)
            route = torch.where(above.any(dim=0), best, route)
            self.last_scores = scores
        self._call.route, self._call.routed = route, routed

    def _apply(self, keys: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        route = self._call.route
        assert route is not None
        if not (route >= 0).any():
            return None
        base = self.ffn_out.weight
        y = output.reshape(keys.shape[0], keys.shape[1], -1)
        for index, memory in enumerate(self._call.routed):
            rows = route == index
            if rows.any():
                extra = F.linear(keys.float(), memory.delta(base).detach()).to(y.dtype)
                y = torch.where(rows[:, None, None], y + extra, y)
        return y.reshape(output.shape)
