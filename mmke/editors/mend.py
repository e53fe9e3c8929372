"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

Edited: the FFN matrices (``ffn_in``, ``ffn_out``) of the last three language layers (``layers``,
``roles``; EasyEdit's BLIP-2 OPT ``fc1``/``fc2``, MiniGPT-4/LLaVA/Qwen2-VL ``up_proj``/
``down_proj`` of the last three layers). The networks and the update rule are in
``mend_nets.py``; the factors and the edited forward in ``mend_factors.py``.

Training (``fit``, on the task's train split, which is never scored). Per train record: the edit
prompt's gradient factors on the unedited model, the pseudo-factors from the networks, and the
meta-loss on the model edited with them (EasyEdit's multimodal trainer, ``MultimodalTrainer
.edit_step``; MEND §3.2 Eq. 4 with its multimodal terms):

    L = c_rephrase · NLL(text rephrase) + c_image · NLL(image rephrase)
        + c_loc · (KL(p_pre ‖ p_post | text loc) + KL(p_pre ‖ p_post | image loc))
        + c_edit · NLL(edit prompt)

NLL is the mean over the target tokens of the new answer; KL is EasyEdit's ``kl_loc_loss``
direction (pre-edit first) averaged over every attended position of the locality prompt.
EasyEdit MM sets cedit = 0.1 on the text rephrase ("edit_outer"), iedit = 0.1 on the image
rephrase, cloc = 1.0 on both KLs, and has *no* term on the edit prompt itself ("edit_inner" is
only logged): ``edit_weight`` defaults to 0 accordingly (the mini world's image-rephrase prompt is
the edit question on the re-rendered picture, which carries the edit prompt's signal anyway).
The gradient reaches the networks through the applied update (``low_rank_delta``); the backbone
is frozen and never written while training.

Regularizers (``reg=odedit``, ``reg=asam``). MEND has no edit-time optimisation: an edit is one
gradient, transformed once, so there is no per-edit loss that extra terms could join; changing
the edit loss whose gradient is transformed would feed the networks factors they were not
trained on. The regularizer therefore enters the *training* objective, as issue 13 asks: for each
train record, ``begin`` is called on the unedited model with the edit request and an
``EditContext`` whose ``trainable`` are the edited matrices W̃ = W − αΔ (functions of the
networks' parameters, so ODEdit's λ network reads what MEND writes), and on the model edited by
the networks the regularizer's objective for that edit, ``task_loss + loss(step)`` (ODEdit's G;
ASAM's L_rel + β·L_align), is added to the meta-loss: the networks learn to produce edits the
regularizer approves of. This mirrors FT, whose loss is ``task_loss + loss(step)`` per step.
The regularizer's objective is taken on one train edit per step (the first of the step's batch),
a stochastic estimate of its mean over edits: a regularizer keeps the state of one edit between
``begin`` and ``end``, ODEdit's dual ascent (``after_step``) changes its λ network in place and
so must wait until ``fit`` has back-propagated the step's loss; it runs once the optimiser has
stepped (``step_done``; AdaptiveLambda: Eq. 13 with the penalty at φ^(k)). It also bounds the
extra forwards (ODEdit's samples, ASAM's latent variants) to one edit's per step. The λ network is
the regularizer's, not MEND's: it is not in the cached networks, but the fit's checkpoint holds it
(``Regularizer.training_state``), so a resumed fit ends as an uninterrupted one.

Under ``accelerate launch`` (``fit``'s data parallelism) every process holds the same
statistics: each merges the moments of every process's rows (``RunningMoments.update``), which
equal one process's statistics of the whole batch. The first record of the batch, whose
regularizer objective is taken, is the main process's; only it takes that term (weighed by the
number of processes, whose gradients are averaged), so the λ network is trained once, as in one
process.

Editing: the factors of the edit prompt on the *current* weights (so in a sequential or online
stream every edit lands on top of the previous ones, as in M-ORE's Table 1, where MEND collapses
over 100 online edits), the networks in eval mode (frozen statistics), W ← W − α δ̃ᵀũ written in
place after ``WeightSnapshot`` saved the originals; ``restore`` copies them back bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmke.data.prompts import edit_prompts
from mmke.data.record import EditRecord
from mmke.editors.base import EditOutcome
from mmke.editors.mend_factors import (Factors, gradient_factors, low_rank_delta, pad_edits,
                                       row_sum_nll)
from mmke.editors.mend_nets import MendNetworks
from mmke.editors.snapshot import WeightSnapshot
from mmke.editors.training import BatchShare, TrainedEditor, TrainingSettings
from mmke.errors import ConfigError
from mmke.regularizers.base import EditContext, Regularizer, RegularizerStep, edit_requests

#: roles MEND may edit: linear maps of a language layer's FFN
ROLES = ("ffn_in", "ffn_out", "ffn_gate")
#: the outer prompts of one train record, in row order (edit_prompts indices)
OUTER = (("t_gen", 1), ("m_gen", 2), ("t_loc", 3), ("m_loc", 4), ("rel", 0))


class MEND(TrainedEditor):
    """Settings (``conf/editor/mend.yaml``): ``layers`` (language layers, negative from the end)
    and ``roles`` (FFN matrices) edited; ``rank`` of the networks' low-rank blocks; ``edit_lr``
    the initial per-matrix edit rate α and ``lr_lr`` its Adam learning rate; the meta-loss weights
    ``rephrase_weight``, ``image_rephrase_weight``, ``locality_weight``, ``edit_weight``;
    ``append_eos`` labels the end token after the target in the edit loss; ``training`` the
    ``TrainingSettings`` (steps, batch_size, lr of the networks, ...)."""

    code_version = "1"

    def __init__(self, layers: Sequence[int] = (-3, -2, -1),
                 roles: Sequence[str] = ("ffn_in", "ffn_out"), rank: int = 1920,
                 edit_lr: float = 1e-4, lr_lr: float = 1e-4, rephrase_weight: float = 0.1,
                 image_rephrase_weight: float = 0.1, locality_weight: float = 1.0,
                 edit_weight: float = 0.0, append_eos: bool = False,
                 training: TrainingSettings | Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, progress: bool = True,
                 regularizer: Regularizer | None = None, name: str = "mend") -> None:
        super().__init__(training=training, cache_dir=cache_dir, progress=progress,
                         regularizer=regularizer, name=name)
        if not layers:
            raise ConfigError("editor.layers: MEND needs at least one layer")
        for role in roles:
            if role not in ROLES:
                raise ConfigError(f"editor.roles: {role!r} is not one of {ROLES}")
        if rank < 1:
            raise ConfigError(f"editor.rank={rank!r} must be >= 1")
        if not edit_lr > 0 or not lr_lr > 0:
            raise ConfigError("editor.edit_lr and editor.lr_lr must be > 0")
        for setting, value in (("rephrase_weight", rephrase_weight),
                               ("image_rephrase_weight", image_rephrase_weight),
                               ("locality_weight", locality_weight), ("edit_weight", edit_weight)):
            if not value >= 0:
                raise ConfigError(f"editor.{setting}={value!r} must be >= 0")
        self.layers, self.roles = [int(i) for i in layers], list(roles)
        self.rank, self.edit_lr, self.lr_lr = int(rank), float(edit_lr), float(lr_lr)
        self.weights = {"t_gen": float(rephrase_weight), "m_gen": float(image_rephrase_weight),
                        "t_loc": float(locality_weight), "m_loc": float(locality_weight),
                        "rel": float(edit_weight)}
        self.append_eos = append_eos
        self.snapshot = WeightSnapshot()
        self._reg_pending = False  # a regularizer edit awaits after_step/end (training only)

    # --- the edited matrices ----------------------------------------------------------------------

    def edited(self) -> list[tuple[str, nn.Linear]]:
        """(label, module) of every edited matrix, in slot order: layer by layer, roles within."""
        assert self.backbone is not None
        mods = self.backbone.modules
        out = []
        for i in self.layers:
            layer = self._resolve_layer(i)
            for role in self.roles:
                try:
                    module = mods.by_role(role, layer)
                except ValueError as err:
                    raise ConfigError(f"editor.roles: {err}") from err
                out.append((f"{role}[{layer}]", module))
        return out

    def _edit_layers(self) -> list[int]:
        assert self.backbone is not None
        return sorted({self._resolve_layer(i) for i in self.layers})

    @property
    def nets(self) -> MendNetworks:
        if not isinstance(self.networks, MendNetworks):
            raise RuntimeError(f"editor={self.name}: fit(train_records) before editing")
        return self.networks

    # --- TrainedEditor ----------------------------------------------------------------------------

    def build_networks(self, train_records: Sequence[EditRecord]) -> nn.Module:
        shapes = [(m.in_features, m.out_features) for _, m in self.edited()]
        return MendNetworks(shapes, self.rank, self.edit_lr)

    def cache_settings(self) -> dict[str, Any]:
        return {"layers": self._edit_layers(), "slots": [label for label, _ in self.edited()],
                "rank": self.rank, "edit_lr": self.edit_lr, "lr_lr": self.lr_lr,
                "weights": self.weights, "append_eos": self.append_eos}

    def optimizer_groups(self, networks: nn.Module) -> list[dict[str, Any]]:
        assert isinstance(networks, MendNetworks)
        rest = [p for n, p in networks.named_parameters() if n != "edit_lrs"]
        return [{"params": rest}, {"params": [networks.edit_lrs], "lr": self.lr_lr}]

    def step_done(self, step: int) -> None:
        self._settle_regularizer()  # the dual ascent, before fit checkpoints the λ network

    def networks_trained(self) -> None:
        self._settle_regularizer()
        self.regularizer.reset()  # the training edits' λ network (ODEdit) is not the edits' one

    def pseudo_factors(self, factors: Sequence[Factors], rows: Sequence[Sequence[int]],
                       update_stats: bool = False, across: BatchShare | None = None
                       ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per edited matrix, per edit (the batch rows ``rows[e]`` of edit e): (ũ, δ̃). With
        ``update_stats`` every edit's rows first join the running statistics, with the rows of
        the other processes of ``across`` (training under accelerate)."""
        nets = self.nets
        out = []
        for slot, f in enumerate(factors):
            pairs = [f.rows(r) for r in rows]
            if update_stats:
                key, _ = nets.slots[slot]
                gt = nets.nets[key]
                gt.u_norm.update(torch.cat([u for u, _ in pairs]), across)
                gt.delta_norm.update(torch.cat([d for _, d in pairs]), across)
            out.append([nets.transform(slot, u, d) for u, d in pairs])
        return out

    def training_loss(self, batch: Sequence[EditRecord], step: int
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        backbone = self.backbone
        assert backbone is not None
        self._settle_regularizer()
        nets, modules = self.nets, [m for _, m in self.edited()]
        prompts = [edit_prompts(r, self.templates) for r in batch]
        edit_batch = backbone.prepare([p[0] for p in prompts], append_eos=self.append_eos)
        factors = gradient_factors(backbone, edit_batch, modules, row_sum_nll(backbone))
        share = self.share_of(batch)
        pseudo = self.pseudo_factors(factors, [[e] for e in range(len(batch))],
                                     update_stats=nets.training, across=share)
        kinds = [(k, i) for k, i in OUTER if self.weights[k] > 0]
        outer = backbone.prepare([p[i] for p in prompts for _, i in kinds])
        row_edit = torch.arange(len(batch), device=outer.input_ids.device
                                ).repeat_interleave(len(kinds))
        locs = [r for r, (k, _) in enumerate(kinds * len(batch)) if k in ("t_loc", "m_loc")]
        pre = None
        if locs:
            with torch.no_grad():
                pre = backbone.forward(outer).logits[locs]
        with low_rank_delta(modules, [pad_edits(p) for p in pseudo], nets.edit_lrs, row_edit):
            out = backbone.forward(outer)
        nll = backbone.nll(outer, out, reduction="none")
        per_row = nll.clone()
        if locs:
            assert pre is not None
            per_row[locs] = _kl_rows(pre, out.logits[locs], outer.attention_mask[locs])
        terms = per_row.reshape(len(batch), len(kinds))
        parts = {k: float(terms[:, j].detach().mean()) for j, (k, _) in enumerate(kinds)}
        weights = torch.tensor([self.weights[k] for k, _ in kinds], device=terms.device)
        loss = share.row_mean((terms * weights).sum(dim=1))  # a mean over the batch's records
        if self.regularizer.active and batch and share.positions[0] == 0:
            # the batch's first edit: one process takes it, for all (gradients are averaged)
            reg = self._regularized(batch[0], modules, [p[0] for p in pseudo], step)
            parts["reg"] = float(reg.detach())
            loss = loss + reg * share.world
        parts["alpha"] = float(nets.edit_lrs.detach().abs().mean())
        return loss, parts

    def _regularized(self, record: EditRecord, modules: Sequence[nn.Linear],
                     pseudo: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     step: int) -> torch.Tensor:
        """The regularizer's objective for one train edit, on the model the networks edited."""
        backbone, reg, nets = self.backbone, self.regularizer, self.nets
        assert backbone is not None
        batch = backbone.prepare([edit_prompts(record, self.templates)[0]],
                                 append_eos=self.append_eos)
        edited = {label: m.weight - nets.edit_lrs[s] * (d.T @ u).to(m.weight.dtype)
                  for s, ((label, m), (u, d)) in enumerate(zip(self.edited(), pseudo))}
        requests = edit_requests([record], self.templates, reg.reveals)
        reg.begin(requests, EditContext(self._edit_layers(), edited, batch))
        try:
            with low_rank_delta(modules, [pad_edits([p]) for p in pseudo], nets.edit_lrs):
                out = backbone.forward(batch, output_hidden_states=reg.needs_hidden_states)
                task = backbone.nll(batch, out)
                total = task + reg.loss(RegularizerStep(step, batch, out, task))
        except BaseException:
            reg.end()
            raise
        self._reg_pending = True  # after_step and end once fit has back-propagated this step
        return total

    def _settle_regularizer(self) -> None:
        """The previous step's ``after_step`` (ODEdit's dual ascent) and ``end``."""
        if self._reg_pending:
            self._reg_pending = False
            try:
                self.regularizer.after_step()
            finally:
                self.regularizer.end()

    # --- editing ----------------------------------------------------------------------------------

    @torch.no_grad()
    def updates(self, records: Sequence[EditRecord]) -> dict[str, torch.Tensor]:
        """α Σ_p δ̃_p ũ_pᵀ for each edited matrix (by label): what an edit of ``records``
        subtracts from the current weights. All records' positions form one edit."""
        backbone = self.backbone
        assert backbone is not None
        nets, edited = self.nets, self.edited()
        batch = backbone.prepare([edit_prompts(r, self.templates)[0] for r in records],
                                 append_eos=self.append_eos)
        factors = gradient_factors(backbone, batch, [m for _, m in edited], row_sum_nll(backbone))
        pseudo = self.pseudo_factors(factors, [range(len(records))])
        return {label: nets.edit_lrs[s] * (pairs[0][1].T @ pairs[0][0])
                for s, ((label, _), pairs) in enumerate(zip(edited, pseudo))}

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        if self.networks is not None:
            self.networks.eval()
        deltas = self.updates(records)
        norm = math.sqrt(sum(float(d.float().pow(2).sum()) for d in deltas.values()))
        if not math.isfinite(norm):
            return EditOutcome(ok=False, steps=1, message="non-finite update; nothing applied")
        params = {f"{label}.weight": m.weight for label, m in self.edited()}
        self.snapshot.save(params)
        with torch.no_grad():
            for label, module in self.edited():
                module.weight.sub_(deltas[label].to(module.weight.dtype))
        return EditOutcome(ok=True, steps=1, extra={"update_norm": norm})

    def restore(self) -> None:
        self.snapshot.restore()
        self.regularizer.reset()


def _kl_rows(pre_logits: torch.Tensor, post_logits: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """KL(p_pre ‖ p_post) per position, averaged over each row's attended positions: ``[rows]``
    (EasyEdit's ``kl_loc_loss``, per row)."""
    pre = F.log_softmax(pre_logits.float(), dim=-1)
    post = F.log_softmax(post_logits.float(), dim=-1)
    kl = (pre.exp() * (pre - post)).sum(dim=-1)
    weight = mask.to(kl.dtype)
    return (kl * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
