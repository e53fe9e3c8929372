"""WISE: side memories of one FFN output matrix, an activation router, knowledge shards, TIES.

Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language
Models" (NeurIPS 2024), §2.3; EasyEdit's ``easyeditor/models/wise`` read for the multimodal
settings (never copied). The routing score and merging live in ``mmke.editors.side_memory``.
The backbone's weights never change; ``restore`` removes both hooks and every side memory.

One edit (§2.3.1, "side memory design"; the equations are written out, not numbered, because the
paper's text could not be checked here):
- The edit trains the open shard W_v' (a side memory, started as a copy of W_v) at language layer
  ``layer``. Every row of every forward goes through it while it trains (EasyEdit's editing mode),
  including a regularizer's own forwards, so their terms act on it.
- Loss L = −log P_{W_v'}(y_e | x_e) + L_a, the routing loss
    L_a = max(0, Δ_act(x_i) − α) + max(0, β − Δ_act(x_e)) + max(0, γ − (Δ_act(x_e) − Δ_act(x_i))),
  averaged over the irrelevant inputs x_i: edits activate the side memory above β, irrelevant
  inputs stay below α, with a gap of at least γ. The irrelevant inputs are ``irrelevant_prompts``
  out-of-scope prompts of the TRAIN split per edit (``TrainPool.out_of_scope``), never a prompt
  scored for the record (EasyEdit's multimodal path uses the record's locality prompt).
- SGD (``lr``, ``steps``). Only the shard's entries under its random mask M (ratio ρ =
  ``mask_ratio``) move: W_v' ← W_v' − lr·M⊙(∇ + wd·W_v') (EasyEdit masks the gradient, then its
  optimiser's weight decay moves every entry; we keep the shard exactly inside its subspace).
  After each step W_v' is clamped to W_v ± ``norm_constraint`` (EasyEdit's norm constraint).
- The threshold: after the edit, its own Δ_act(x_e); the memory's ε = ``act_ratio`` · the
  smallest of these over its edits (EasyEdit's ``editing_mean_act.min_act() * act_ratio``).

A stream (§2.3.2, "knowledge sharding and merging"): every ``save_freq`` edits the open shard is
closed and a new one starts from W_v with a new random mask; every ``merge_freq`` edits the closed
shards are merged by TIES (``ties_merge``: trim to ``density``, elect sign, disjoint mean) into
the merged side memory (``retrieve=false``, WISE-Merge; the merged memory joins the merge as one
more task vector) or into a new side memory of its own (``retrieve=true``, WISE-Retrieve). The
router chooses among every side memory there is (merged, closed, open) by the largest score above
its threshold. With the 7B defaults (save 500, merge 1000) a stream shorter than 500 edits lives in
one shard.

Regularizers (``reg=odedit``, ``reg=asam``) enter through the seam as in FT and T-Patcher:
``begin`` with the edit layer and the open shard as trainable parameter, ``loss`` at every
step, ``after_step``, ``end``. The edit request holds the edit prompt and fingerprints only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmke.backbones.base import Backbone, ModelBatch
from mmke.data.prompts import PromptTemplates
from mmke.data.record import EditRecord, Prompt
from mmke.editors.base import EditOutcome, Editor
from mmke.editors.side_memory import (MemoryRouter, SideMemory, activation_scores, random_mask,
                                      ties_merge)
from mmke.editors.snapshot import only_trainable
from mmke.errors import ConfigError
from mmke.regularizers.base import (EditContext, EditRequest, Regularizer, RegularizerStep,
                                    TrainRecords, edit_request)
from mmke.regularizers.pool import TrainPool


@dataclass
class _Keys:
    """FFN keys A(x) of some prompts at the edited layer and their attended tokens (detached:
    A(x) is computed below the side memory, so it does not depend on it)."""

    keys: torch.Tensor       # [rows, seq, d_ff]
    attended: torch.Tensor   # [rows, seq] bool

    def scores(self, delta: torch.Tensor) -> torch.Tensor:
        return activation_scores(self.keys, delta, self.attended)


@dataclass
class _State:
    """What ``_apply`` needs to undo a failed call."""

    merged: list[SideMemory]
    closed: list[SideMemory]
    shard: SideMemory | None
    shard_weight: torch.Tensor | None
    shard_min_act: float
    shard_edits: int
    n_edits: int
    generator: torch.Tensor


class WISE(Editor):
    """WISE on the FFN output matrix of language layer ``layer`` (negative: from the end).

    ``lr``, ``steps``, ``weight_decay``: SGD on the open shard; ``mask_ratio``: ρ, the share of
    entries each shard trains; ``norm_constraint``: clamp to W_v ± this (None: no clamp);
    ``alpha``, ``beta``, ``gamma``: the routing margins; ``act_ratio``: ε = act_ratio · min
    edit activation; ``save_freq``, ``merge_freq``: edits per shard, edits between merges (a
    multiple of ``save_freq``); ``density``: TIES's trim density; ``retrieve``: keep each merge
    as its own side memory; ``irrelevant_prompts``: train-split out-of-scope prompts per edit;
    ``early_stop_loss``: stop once the edit's NLL is below it (None: always ``steps``);
    ``append_eos``: also train the end token after the target; ``seed``: masks and draws.
    """

    def __init__(self, layer: int = 23, lr: float = 1.0, steps: int = 10,
                 weight_decay: float = 1e-5, mask_ratio: float = 0.2,
                 norm_constraint: float | None = 1.0, alpha: float = 5.0, beta: float = 20.0,
                 gamma: float = 10.0, act_ratio: float = 0.4, save_freq: int = 500,
                 merge_freq: int = 1000, density: float = 0.53, retrieve: bool = False,
                 irrelevant_prompts: int = 1, early_stop_loss: float | None = None,
                 append_eos: bool = False, seed: int = 0,
                 regularizer: Regularizer | None = None, name: str = "wise") -> None:
        super().__init__(regularizer, name)
        _check_settings(lr=lr, steps=steps, weight_decay=weight_decay, mask_ratio=mask_ratio,
                        norm_constraint=norm_constraint, act_ratio=act_ratio,
                        save_freq=save_freq, merge_freq=merge_freq, density=density,
                        irrelevant_prompts=irrelevant_prompts)
        self.layer, self.lr, self.steps, self.weight_decay = layer, lr, steps, weight_decay
        self.mask_ratio, self.norm_constraint = mask_ratio, norm_constraint
        self.alpha, self.beta, self.gamma, self.act_ratio = alpha, beta, gamma, act_ratio
        self.save_freq, self.merge_freq, self.density = save_freq, merge_freq, density
        self.retrieve, self.irrelevant_prompts = retrieve, irrelevant_prompts
        self.early_stop_loss, self.append_eos, self.seed = early_stop_loss, append_eos, seed
        self.router: MemoryRouter | None = None
        self.pool: TrainPool | None = None
        self._reset_memories()

    def _reset_memories(self) -> None:
        #: merged side memories (one under WISE-Merge, one per merge under WISE-Retrieve)
        self.merged: list[SideMemory] = []
        #: closed shards waiting for the next merge
        self.closed: list[SideMemory] = []
        self.shard: SideMemory | None = None
        self.n_edits = 0
        self._generator = torch.Generator().manual_seed(self.seed)

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        super().attach(backbone, templates, train_records)
        mods = backbone.modules
        self._layer = self._resolve_layer(self.layer)
        if self.router is not None:
            self.router.remove()
        self.router = MemoryRouter(backbone.decoder, mods.ffn_out(self._layer))
        self._reset_memories()
        if self.irrelevant_prompts > 0:
            if train_records is None:
                raise ConfigError(
                    "editor=wise draws the irrelevant inputs of its routing loss from the train "
                    f"split (editor.irrelevant_prompts={self.irrelevant_prompts}); attach it with "
                    "train_records, or set editor.irrelevant_prompts=0")
            self.pool = TrainPool(train_records, templates, seed=self.seed)

    # --- the side memories ---------------------------------------------------------------

    @property
    def memories(self) -> list[SideMemory]:
        """Every side memory the router may choose: merged, closed shards, the open shard."""
        open_ = [self.shard] if self.shard is not None and self.shard.n_edits else []
        return self.merged + self.closed + open_

    def threshold(self, memory: SideMemory) -> float:
        """ε of ``memory``: ``act_ratio`` times the smallest activation of its edits."""
        return self.act_ratio * memory.min_act

    def _sync_router(self) -> None:
        assert self.router is not None
        self.router.candidates = [(m, self.threshold(m)) for m in self.memories]

    @property
    def _base(self) -> nn.Parameter:
        assert self.backbone is not None
        return self.backbone.modules.ffn_out(self._layer).weight

    def _open_shard(self) -> SideMemory:
        base = self._base.detach().float()
        return SideMemory(nn.Parameter(base.clone()),
                          mask=random_mask(base.shape, self.mask_ratio, self._generator)
                          .to(base.device))

    # --- editing -------------------------------------------------------------------------

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        """Edit the records one after another (the paper's lifelong stream). A non-finite loss
        undoes every change of this call."""
        assert self.backbone is not None and self.router is not None
        self.router.attach()
        saved = self._save()
        outcome = EditOutcome()
        frozen = only_trainable(self.backbone.model, [])  # the shard is the only trainable
        try:
            for record in records:
                if not self._edit_one(record, outcome):
                    self._load(saved)
                    outcome.fail_non_finite()
                    break
        finally:
            frozen.restore()
            self.router.force = None
            self._sync_router()
        if not self.memories:
            self.router.remove()
        outcome.extra["side_memories"] = float(len(self.memories))
        return outcome

    def _edit_one(self, record: EditRecord, outcome: EditOutcome) -> bool:
        backbone, router = self.backbone, self.router
        assert backbone is not None and router is not None
        request = edit_request(record, self.templates, self.regularizer.reveals)
        batch = backbone.prepare([request.prompt], append_eos=self.append_eos)
        if self.shard is None:
            self.shard = self._open_shard()
        shard = self.shard
        edit_keys = self._keys(batch)
        irrelevant = self._irrelevant(request)
        reg = self.regularizer
        shard.weight.requires_grad_(True)
        try:
            # begin sees the model before this edit: routed, not forced through the shard
            reg.begin([request], EditContext([self._layer], {"side_memory": shard.weight},
                                             batch))
            router.force = shard
            for step in range(self.steps):
                out = backbone.forward(batch, output_hidden_states=reg.needs_hidden_states)
                task_loss = backbone.nll(batch, out)
                delta = shard.delta(self._base)
                loss = (task_loss + self.routing_loss(edit_keys.scores(delta),
                                                      None if irrelevant is None
                                                      else irrelevant.scores(delta))
                        + reg.loss(RegularizerStep(step, batch, out, task_loss)))
                outcome.final_loss = loss.item()
                if not math.isfinite(outcome.final_loss):
                    return False
                if self.early_stop_loss is not None and task_loss.item() < self.early_stop_loss:
                    break
                shard.weight.grad = None
                loss.backward()
                self._step(shard)
                reg.after_step()
                outcome.steps += 1
        finally:
            router.force = None
            shard.weight.requires_grad_(False)
            shard.weight.grad = None
            reg.end()
        self._written(shard, edit_keys, irrelevant, outcome)
        return True

    def routing_loss(self, edit: torch.Tensor, irrelevant: torch.Tensor | None) -> torch.Tensor:
        """L_a: β − Δ_act(x_e) above zero pushes the edit up; with irrelevant inputs, also
        Δ_act(x_i) − α (kept low) and γ − (Δ_act(x_e) − Δ_act(x_i)) (the gap), averaged over
        them."""
        loss = torch.relu(self.beta - edit).mean()
        if irrelevant is None or irrelevant.numel() == 0:
            return loss
        gap = edit.mean() - irrelevant
        return (loss + torch.relu(irrelevant - self.alpha).mean()
                + torch.relu(self.gamma - gap).mean())

    @torch.no_grad()
    def _step(self, shard: SideMemory) -> None:
        """Masked SGD on the shard's entries, then the clamp to W_v ± ``norm_constraint``."""
        weight, grad = shard.weight, shard.weight.grad
        assert grad is not None and shard.mask is not None
        update = (grad + self.weight_decay * weight) * shard.mask
        weight.sub_(self.lr * update)
        if self.norm_constraint is not None:
            base = self._base.detach().float()
            weight.copy_(torch.maximum(torch.minimum(weight, base + self.norm_constraint),
                                       base - self.norm_constraint))

    @torch.no_grad()
    def _written(self, shard: SideMemory, edit_keys: _Keys, irrelevant: _Keys | None,
                 outcome: EditOutcome) -> None:
        """Record the edit's activation (the threshold), then close / merge as the stream asks."""
        delta = shard.delta(self._base)
        act = float(edit_keys.scores(delta).min())
        shard.min_act = min(shard.min_act, act)
        shard.n_edits += 1
        self.n_edits += 1
        outcome.extra["edit_activation"] = act
        outcome.extra["threshold"] = self.threshold(shard)
        if irrelevant is not None:
            outcome.extra["irrelevant_activation_max"] = float(irrelevant.scores(delta).max())
        if self.n_edits % self.save_freq == 0:
            shard.mask = None
            self.closed.append(shard)
            self.shard = None
        if self.n_edits % self.merge_freq == 0:
            self.merge()
            outcome.extra["merged"] = 1.0
        self._sync_router()  # the next edit of this call starts from the routed model

    @torch.no_grad()
    def merge(self) -> None:
        """TIES-merge the closed shards (§2.3.2): into the merged side memory (WISE-Merge,
        which joins as one more task vector) or as a new side memory (WISE-Retrieve). The
        result's threshold is the smallest of its parts'."""
        parts = list(self.closed) if self.retrieve else self.merged + self.closed
        if not parts:
            return
        base = self._base.detach().float()
        weight = ties_merge(base, [m.weight.detach() for m in parts], self.density)
        memory = SideMemory(nn.Parameter(weight, requires_grad=False),
                            min_act=min(m.min_act for m in parts),
                            n_edits=sum(m.n_edits for m in parts))
        self.merged = self.merged + [memory] if self.retrieve else [memory]
        self.closed = []

    # --- inputs ----------------------------------------------------------------------------

    def _keys(self, batch: ModelBatch) -> _Keys:
        """A(x) at the edited layer for ``batch`` (one forward without grad)."""
        assert self.backbone is not None
        with torch.no_grad():
            keys = self.backbone.ffn_keys(batch, [self._layer])[self._layer]
        return _Keys(keys.detach(), batch.attention_mask.bool())

    def _irrelevant(self, request: EditRequest) -> _Keys | None:
        """The irrelevant inputs x_i of L_a: train-split out-of-scope prompts."""
        if self.pool is None or self.backbone is None:
            return None
        prompts = self.pool.out_of_scope(request, self.irrelevant_prompts)
        return self._keys(self.backbone.prepare(prompts)) if prompts else None

    def route_scores(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per side memory and prompt (with its target): Δ_act and whether it exceeds the
        memory's threshold, [memories, prompts] each (for inspection and the tests)."""
        assert self.backbone is not None
        if not self.memories:
            empty = torch.zeros(0, len(prompts))
            return empty, empty.bool()
        keys = self._keys(self.backbone.prepare(prompts))
        scores = torch.stack([keys.scores(m.delta(self._base).detach()) for m in self.memories])
        eps = scores.new_tensor([self.threshold(m) for m in self.memories])[:, None]
        return scores, scores > eps

    # --- undo ------------------------------------------------------------------------------

    def _save(self) -> _State:
        shard = self.shard
        return _State(list(self.merged), list(self.closed), shard,
                      None if shard is None else shard.weight.detach().clone(),
                      math.inf if shard is None else shard.min_act,
                      0 if shard is None else shard.n_edits, self.n_edits,
                      self._generator.get_state())

    @torch.no_grad()
    def _load(self, state: _State) -> None:
        self.merged, self.closed, self.shard = state.merged, state.closed, state.shard
        if state.shard is not None and state.shard_weight is not None:
            state.shard.weight.copy_(state.shard_weight)
            state.shard.min_act, state.shard.n_edits = state.shard_min_act, state.shard_edits
        self.n_edits = state.n_edits
        self._generator.set_state(state.generator)

    def restore(self) -> None:
        """Remove both hooks and every side memory; the backbone was never changed."""
        if self.router is not None:
            self.router.remove()
        self._reset_memories()
        self.regularizer.reset()


def _check_settings(*, lr: float, steps: int, weight_decay: float, mask_ratio: float,
                    norm_constraint: float | None, act_ratio: float, save_freq: int,
                    merge_freq: int, density: float, irrelevant_prompts: int) -> None:
    """ConfigError naming the first bad setting."""
    if not lr > 0:
        raise ConfigError(f"editor.lr={lr!r} must be > 0")
    for setting, value in (("steps", steps), ("save_freq", save_freq),
                           ("merge_freq", merge_freq)):
        if value < 1:
            raise ConfigError(f"editor.{setting}={value!r} must be >= 1")
    for setting, value in (("weight_decay", weight_decay),
                           ("irrelevant_prompts", irrelevant_prompts)):
        if value < 0:
            raise ConfigError(f"editor.{setting}={value!r} must be >= 0")
    for setting, value in (("mask_ratio", mask_ratio), ("density", density),
                           ("act_ratio", act_ratio)):
        if not 0 < value <= 1:
            raise ConfigError(f"editor.{setting}={value!r} must be in (0, 1]")
    if norm_constraint is not None and not norm_constraint > 0:
        raise ConfigError(f"editor.norm_constraint={norm_constraint!r} must be > 0 or null")
    if merge_freq % save_freq:
        raise ConfigError(f"editor.merge_freq={merge_freq} must be a multiple of "
                          f"editor.save_freq={save_freq}: a merge takes closed shards")
