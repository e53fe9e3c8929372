"""M-ORE: modality-decoupled online recursive editing (M-ORE §4, Appendix A.3, A.6, D).

Edited modules: the FFN output matrices (role ``ffn_out``) of the last ``n_layers`` language
layers and, with ``projector``, the projector's last linear map (``projector_out``). Each gets a
``LowRankWrite`` (ΔW = (α/r)·B·A, A orthonormal and frozen, B = 0 at first: Eq. 7-8) and its own
preconditioner P = (I + S)⁻¹ (Eq. 10, 13): language layers and the projector keep separate
statistics with separate η and λ (§4.4, "layer-wise decoupled statistics").

One edit is one closed-form write per module, no iterative optimisation (Appendix A.6):
1. The step context B_t is the edit prompt and ``loc_samples`` out-of-scope train-split prompts.
   Their forward captures each module's keys (its inputs). z̄ is a masked mean over the keys of
   the module's modality (Eq. 9-10, §4.4): the text positions of B_t for a language layer (image
   tokens and padding excluded), the projector's own inputs (image features of B_t's pictures)
   for the projector. P is updated by Eq. 13.
2. G = ∇_B L_edit with L_edit = L_rel + L_gen + L_loc (Eq. 19-22): L_rel the edit's NLL; L_gen
   the NLL of ``gen_samples`` in-scope train-split neighbours plus the edit's NLL again, as Eq. 21
   writes it; L_loc = KL(p_θ ‖ p_θ{t-1}) of the next token after each out-of-scope prompt. All
   are taken at θ_{t-1}, where L_loc's gradient is exactly zero (a KL at its minimum): in a single
   closed-form step locality is the preconditioner's job, as §4.1 frames it. L_loc is computed
   anyway, so the reported loss is Eq. 19's.
3. B ← B − η·G·P (Eq. 12).

No leakage: the neighbours and out-of-scope prompts come from the train split (``TrainPool``),
never a prompt scored for the record (M-ORE's Eq. 21-22 draw from the record's own rephrase and
locality sets; that reading is not offered here).

Cost per edit: two forwards (step context, neighbours), one backward, and O(r²) per module for P (O(r³) with
``no_pooling``), whatever t is; nothing is stored per edit. ``restore`` removes the hooks and
starts B, P (and, under ``no_freeze``, A) afresh: the backbone's weights never change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmke.backbones.base import IGNORE_INDEX, Backbone, ModelBatch
from mmke.data.prompts import PromptTemplates
from mmke.data.record import EditRecord
from mmke.editors.base import EditOutcome, Editor
from mmke.editors.lowrank import LowRankWrite
from mmke.errors import ConfigError, check_choice
from mmke.regularizers.base import EditRequest, Regularizer, TrainRecords, edit_request
from mmke.regularizers.divergence import kl_post_pre_logprobs
from mmke.regularizers.pool import TrainPool

VARIANTS = ("full", "no_freeze", "no_pooling")


def first_answer_logprobs(batch: ModelBatch, logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token right after each prompt (the position predicting the
    first target token), [batch, vocab]: M-ORE's p(·|x)."""
    shifted = batch.labels[:, 1:] != IGNORE_INDEX
    first = shifted.float().argmax(dim=1)
    rows = torch.arange(len(batch), device=logits.device)
    return torch.log_softmax(logits[rows, first].float(), dim=-1)


def text_positions(batch: ModelBatch) -> torch.Tensor:
    """[batch, seq] mask of the attended positions that are not image tokens."""
    return batch.attention_mask.bool() & ~batch.image_token_mask


class MORE(Editor):
    """M-ORE on the last ``n_layers`` language layers' ``ffn_out`` (and the projector).

    ``rank`` r, ``alpha_over_r`` (ΔW = (α/r)·B·A), ``eta``/``lam`` for language layers,
    ``eta_vis``/``lam_vis`` for the projector (None: the language values); ``variant``: full |
    no_freeze | no_pooling (Table 3); ``gen_samples``/``loc_samples``: train-split neighbours and
    out-of-scope prompts per edit; ``append_eos``: label the end token after the target too.
    """

    accepts_regularizer = False

    def __init__(self, rank: int = 512, alpha_over_r: float = 2.0, eta: float = 0.1,
                 lam: float = 2000.0, eta_vis: float | None = None, lam_vis: float | None = None,
                 n_layers: int = 7, projector: bool = True, variant: str = "full",
                 gen_samples: int = 2, loc_samples: int = 2, append_eos: bool = False,
                 seed: int = 0, regularizer: Regularizer | None = None,
                 name: str = "more") -> None:
        if regularizer is not None and regularizer.active:
            raise ConfigError(
                f"editor=more takes no regularizer (reg={regularizer.name}): its edit is one "
                "closed-form write from a gradient taken at the model before the edit, where "
                "KL terms vanish; M-ORE's own L_edit (Eq. 19-22) is built in; use reg=none")
        super().__init__(regularizer, name)
        check_choice("editor.variant", variant, VARIANTS)
        if rank < 1 or n_layers < 0 or (n_layers == 0 and not projector):
            raise ConfigError("editor.rank must be >= 1 and M-ORE needs a layer or the projector")
        for setting, value in (("eta", eta), ("lam", lam), ("alpha_over_r", alpha_over_r)):
            if not value > 0:
                raise ConfigError(f"editor.{setting}={value!r} must be > 0")
        if gen_samples < 0 or loc_samples < 0:
            raise ConfigError("editor.gen_samples and editor.loc_samples must be >= 0")
        self.rank, self.alpha_over_r = rank, alpha_over_r
        self.eta, self.lam = eta, lam
        self.eta_vis = eta if eta_vis is None else eta_vis
        self.lam_vis = lam if lam_vis is None else lam_vis
        self.n_layers, self.projector, self.variant = n_layers, projector, variant
        self.gen_samples, self.loc_samples = gen_samples, loc_samples
        self.append_eos, self.seed = append_eos, seed
        self.pool: TrainPool | None = None
        self.language: dict[int, LowRankWrite] = {}
        self.vision: LowRankWrite | None = None

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        super().attach(backbone, templates, train_records)
        n = backbone.modules.num_language_layers
        if self.n_layers > n:
            raise ConfigError(f"editor.n_layers={self.n_layers}: the model has {n} language layers")
        if (self.gen_samples or self.loc_samples) and train_records is None:
            raise ConfigError("editor=more draws its neighbours and out-of-scope prompts from the "
                              "train split; attach it with train_records, or set "
                              "editor.gen_samples=0 editor.loc_samples=0")
        if train_records is not None:
            self.pool = TrainPool(train_records, templates, seed=self.seed)
        self.restore()

    @property
    def writes(self) -> list[LowRankWrite]:
        return [*self.language.values(), *([self.vision] if self.vision is not None else [])]

    def _build(self) -> None:
        """Fresh writes: A from the seed (the same after every restore), B = 0, P = (1+λ)⁻¹I."""
        assert self.backbone is not None
        mods = self.backbone.modules
        generator = torch.Generator().manual_seed(self.seed)
        pooled = self.variant != "no_pooling"
        layers = range(mods.num_language_layers - self.n_layers, mods.num_language_layers)
        try:
            self.language = {
                i: LowRankWrite(mods.ffn_out(i), self.rank, self.alpha_over_r, self.eta, self.lam,
                                generator, pooled) for i in layers}
            self.vision = None
            if self.projector:
                out = mods.projector_out()
                # the projector's input may be narrower than r (A needs orthonormal rows)
                self.vision = LowRankWrite(out, min(self.rank, out.in_features),
                                           self.alpha_over_r, self.eta_vis, self.lam_vis,
                                           generator, pooled)
        except ValueError as err:
            raise ConfigError(f"editor.rank={self.rank}: {err}") from err

    # --- editing ----------------------------------------------------------------------------

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        outcome = EditOutcome()
        for record in records:
            loss = self._edit_one(edit_request(record, self.templates))
            outcome.steps += 1
            outcome.final_loss = loss
            if not torch.isfinite(torch.tensor(loss)):
                outcome.fail_non_finite()  # nothing was written: the state is the one before
                break
        return outcome

    def _edit_one(self, request: EditRequest) -> float:
        backbone = self.backbone
        assert backbone is not None
        edit = request.prompt
        gen = self.pool.neighbours(request, self.gen_samples) if self.pool else []
        loc = self.pool.out_of_scope(request, self.loc_samples) if self.pool else []
        context = backbone.prepare([edit, *loc], append_eos=self.append_eos)
        writes = self.writes
        for w in writes:
            w.hook_on()
            w.B.requires_grad_(True)
            w.A.requires_grad_(self.variant == "no_freeze")
            w.active, w.capturing, w.keys = True, True, []
        try:
            out = backbone.forward(context)
            for w in writes:
                w.capturing = False
            losses = backbone.nll(context, out, reduction="none")
            loss = 2 * losses[0]  # L_rel (Eq. 20) and the edit's own term of L_gen (Eq. 21)
            if loc:  # Eq. 22: mean over the out-of-scope prompts
                # p_θ{t-1} is this very forward (nothing is written yet), so no second forward:
                # its detached copy is the reference, and the term's value and gradient are zero
                post = first_answer_logprobs(context, out.logits)[1:]
                loss = loss + kl_post_pre_logprobs(post, post.detach())
            if gen:  # Eq. 21: mean over the neighbours
                batch = backbone.prepare(gen, append_eos=self.append_eos)
                loss = loss + backbone.nll(batch, backbone.forward(batch), reduction="none").mean()
            params = [w.B for w in writes] + ([w.A for w in writes]
                                              if self.variant == "no_freeze" else [])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            if not torch.isfinite(loss):
                return float(loss.detach())
            self._observe(context)
            for i, w in enumerate(writes):
                w.B.requires_grad_(False)
                w.A.requires_grad_(False)
                grad_B = grads[i] if grads[i] is not None else torch.zeros_like(w.B)
                w.write(grad_B)
                if self.variant == "no_freeze" and grads[len(writes) + i] is not None:
                    w.move_basis(grads[len(writes) + i])
        finally:
            for w in writes:
                w.capturing, w.keys = False, []
                w.B.requires_grad_(False)
                w.A.requires_grad_(False)
                w.active = w.active and bool(w.B.any())
        return float(loss.detach())

    def _observe(self, context: ModelBatch) -> None:
        """Eq. 9-10, 13 per module from the keys the context forward captured."""
        text = text_positions(context)
        shape = (*context.input_ids.shape, -1)
        for w in self.language.values():
            (keys,) = w.keys  # one call per forward; OPT flattens [batch, seq]
            w.observe(keys.reshape(shape)[text])
        if self.vision is not None and self.vision.keys:
            (keys,) = self.vision.keys  # the projector only ever sees image features
            self.vision.observe(keys.reshape(-1, keys.shape[-1]))

    def restore(self) -> None:
        for w in self.writes:
            w.remove()
        self.language, self.vision = {}, None
        if self.backbone is not None:
            self._build()
