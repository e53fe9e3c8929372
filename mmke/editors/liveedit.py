"""LiveEdit (Chen et al., CVPR 2025, "Lifelong Knowledge Editing for Vision Language Models with
Low-Rank Mixture-of-Experts"; the networks are in ``liveedit_nets``).

- **Editing** (§3.2): the edit's states at one middle decoder layer (picture, question and
  answer, teacher-forced) go through the trained expert generator, which returns a rank-r expert
  (C, R) and the edit's routing features (textual, and visual as the question reads the
  picture). The expert joins the repository; nothing is optimised and no weight changes.
- **Inference** (§3.3): a forward hook on that layer reads each row's own states there. Hard
  routing keeps the experts whose visual similarity to the input beats the input's similarity to
  a learned prototype picture; soft routing weighs the kept ones by c = softmax(s)·sigmoid(s) of
  the textual similarity; the layer's output gets Δh = Σ c_m·ReLU(LN(h)C_mᵀ)R_m at every
  position. A row without a picture matches no edit's visual scope, so it is left alone (the
  paper's routing reads the picture; mmke's T-Loc prompts have none).
- **Training** (§3.4, the authors' ``train_a_batch``), backbone frozen: for a batch of train
  records, experts from their edits; reliability and generality (text rephrase, image
  rephrase) NLL with each row's own expert plus a random set of the batch's others; KL(post ‖ pre)
  on multimodal-locality prompts with a random set; the soft-routing loss (softmax and sigmoid
  terms) and the hard-routing neighbour and prototype losses over the batch. Train records only:
  nothing scored enters. Under ``accelerate launch`` each process runs its share of the batch's
  forwards, but the terms coupling the batch read all of it: the experts the hook builds and the
  routing features are gathered from every process with their gradients (``BatchShare.gather``),
  the random draws are the one-process draws, and the means are weighed so that the processes'
  averaged gradients are the one-process gradient.

Positions: image tokens are the picture; attended text tokens that are not answer tokens are
the question (the family's template included); answer tokens are the teacher-forced target.
Regularizers: editing has no loss, so ODEdit and ASAM have nothing to act on (refused).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mmke.backbones.base import IGNORE_INDEX, ForwardOutput, ModelBatch
from mmke.data.prompts import edit_prompts
from mmke.data.record import EditRecord, Prompt
from mmke.editors.base import EditOutcome
from mmke.editors.liveedit_nets import (
    LiveEditNetworks, RoutingFeatures, neighbour_loss, prototype_loss, soft_coefficients,
    soft_routing_loss)
from mmke.editors.training import BatchShare, TrainedEditor
from mmke.errors import ConfigError
from mmke.regularizers.base import Regularizer
from mmke.regularizers.divergence import locality_kl



@dataclass
class Segments:
    """Which positions of a batch are the picture, the question, and attended at all."""

    vision: torch.Tensor
    question: torch.Tensor
    attended: torch.Tensor

    @classmethod
    def of(cls, batch: ModelBatch) -> Segments:
        attended = batch.attention_mask.bool()
        vision = batch.image_token_mask.bool() & attended
        answer = batch.labels != IGNORE_INDEX
        return cls(vision, attended & ~vision & ~answer, attended)

    @property
    def has_image(self) -> torch.Tensor:
        return self.vision.any(dim=1)


@dataclass
class Experts:
    """The repository: per edit its routing features and its expert's two factors."""

    text: torch.Tensor     # [n, eqe_n, module_dim]
    vision: torch.Tensor   # [n, eqe_n, module_dim]
    c: torch.Tensor        # [n, rank, hidden]
    r: torch.Tensor        # [n, rank, hidden]

    def __len__(self) -> int:
        return self.text.shape[0]

    def gathered(self, share: BatchShare) -> Experts:
        """The experts of the whole batch, in batch order, from this process's share of them."""
        return Experts(*(share.gather(t) for t in (self.text, self.vision, self.c, self.r)))

    def extended(self, other: Experts) -> Experts:
        mine = (self.text, self.vision, self.c, self.r)
        theirs = (other.text, other.vision, other.c, other.r)
        return Experts(*(torch.cat([a, b]) for a, b in zip(mine, theirs)))


@dataclass
class Plan:
    """What the hook does during one forward (or one generation)."""

    segments: Segments | None = None
    experts: Experts | None = None
    allowed: torch.Tensor | None = None   # training: [b, n] experts each row may use
    capture: bool = False                 # only record the layer's states (change nothing)
    make_experts: bool = False            # training: build the batch's experts from these states
    share: BatchShare | None = None       # training: the batch the experts are gathered from
    captured: list[torch.Tensor] = field(default_factory=list)
    coefficients: torch.Tensor | None = None  # kept from generation's first step


class LiveEdit(TrainedEditor):
    """``editor=liveedit``. ``layer``: the hooked decoder layer; ``module_dim`` (d_m), ``heads``,
    ``eqe_n`` (learned queries), ``rank`` and ``lora_scale``: the networks; ``prototype_tokens``:
    positions of the learned prototype picture; ``*_weight``: the training losses' weights."""

    accepts_regularizer = False
    code_version = "1"

    def __init__(self, layer: int = 21, module_dim: int = 1024, heads: int = 8, eqe_n: int = 4,
                 rank: int = 4, lora_scale: float = 5.0, prototype_tokens: int = 32,
                 rel_weight: float = 1.0, gen_weight: float = 1.0, loc_weight: float = 1.0,
                 soft_routing_weight: float = 1.0, hard_routing_weight: float = 1.0,
                 training: Any = None, cache_dir: str | None = None, progress: bool = True,
                 regularizer: Regularizer | None = None, name: str = "liveedit") -> None:
        if regularizer is not None and regularizer.active:
            raise TypeError("LiveEdit edits without a loss (an expert is generated, not "
                            "optimised), so a regularizer has nothing to act on; use reg=none")
        super().__init__(training=training, cache_dir=cache_dir, progress=progress,
                         regularizer=regularizer, name=name)
        for setting, value in (("module_dim", module_dim), ("heads", heads), ("eqe_n", eqe_n),
                               ("rank", rank), ("prototype_tokens", prototype_tokens)):
            if value < 1:
                raise ConfigError(f"editor.{setting}={value!r} must be >= 1")
        if module_dim % heads:
            raise ConfigError(f"editor.module_dim={module_dim} must be a multiple of "
                              f"editor.heads={heads}")
        self.layer, self.module_dim, self.heads, self.eqe_n = layer, module_dim, heads, eqe_n
        self.rank, self.lora_scale, self.prototype_tokens = rank, lora_scale, prototype_tokens
        self.weights = {"rel": rel_weight, "gen": gen_weight, "loc": loc_weight,
                        "soft_routing": soft_routing_weight, "hard_routing": hard_routing_weight}
        self.repository: Experts | None = None
        self._plan: Plan | None = None
        self._handle: RemovableHandle | None = None

    @property
    def nets(self) -> LiveEditNetworks:
        assert isinstance(self.networks, LiveEditNetworks), "fit() before editing"
        return self.networks

    # --- TrainedEditor -------------------------------------------------------------------------

    def cache_settings(self) -> dict[str, Any]:
        return {"layer": self._resolve_layer(self.layer), "module_dim": self.module_dim,
                "heads": self.heads, "eqe_n": self.eqe_n, "rank": self.rank,
                "lora_scale": self.lora_scale, "prototype_tokens": self.prototype_tokens,
                "weights": self.weights}

    def build_networks(self, train_records: Sequence[EditRecord]) -> nn.Module:
        assert self.backbone is not None
        hidden = self.backbone.decoder.get_input_embeddings().weight.shape[1]
        return LiveEditNetworks(hidden, self.module_dim, self.heads, self.eqe_n, self.rank,
                                self.lora_scale, self.prototype_tokens)

    def training_loss(self, batch: Sequence[EditRecord], step: int
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.backbone is not None
        records = list(batch)
        # the whole batch's size and this process's rows of it: the draws, the experts and the
        # routing losses are those of the whole batch (one process: its records are all of it)
        share = self.share_of(records)
        b, mine = share.size, torch.tensor(share.positions)
        gen = torch.Generator().manual_seed(self.training.seed * 1_000_003 + step)
        prompts = [edit_prompts(r, self.templates) for r in records]
        kinds = {"rel": 0, "t_gen": 1, "m_gen": 2, "m_loc": 4}
        device = self.backbone.device
        own = torch.eye(b, dtype=torch.bool, device=device)[mine]

        def others() -> torch.Tensor:
            return _random_prefix(b, gen, device)[mine]

        states: dict[str, tuple[torch.Tensor, Segments]] = {}
        parts: dict[str, torch.Tensor] = {}
        with self._hooked():
            # reliability: the edits' own prompts; the hook builds the batch's experts from them
            rel, rel_plan, rel_batch = self._run([p[kinds["rel"]] for p in prompts],
                                                 Plan(make_experts=True, share=share,
                                                      allowed=own | others()))
            experts = rel_plan.experts
            assert experts is not None
            states["rel"] = (rel_plan.captured[0], Segments.of(rel_batch))
            parts["rel"] = share.row_mean(self.backbone.nll(rel_batch, rel, reduction="none"))
            parts["gen"] = torch.zeros((), device=device)
            for kind in ("t_gen", "m_gen"):
                out, plan, model_batch = self._run(
                    [p[kinds[kind]] for p in prompts],
                    Plan(experts=experts, allowed=own | others()))
                states[kind] = (plan.captured[0], Segments.of(model_batch))
                parts["gen"] = parts["gen"] + share.row_mean(
                    self.backbone.nll(model_batch, out, reduction="none"))
            loc_prompts = [p[kinds["m_loc"]] for p in prompts]
            with torch.no_grad():
                pre, _, _ = self._run(loc_prompts, Plan(capture=True))
            out, plan, loc_batch = self._run(loc_prompts, Plan(experts=experts, allowed=others()))
            states["m_loc"] = (plan.captured[0], Segments.of(loc_batch))
            rows, cols = loc_batch.target_positions()
            # a mean over the whole batch's target tokens
            parts["loc"] = share.item_mean(
                locality_kl(out.logits[rows, cols], pre.logits[rows, cols]), len(rows))
        parts.update(self._routing_losses(states, gen, share))
        loss = sum(self.weights[k] * parts[k] for k in self.weights)
        assert isinstance(loss, torch.Tensor)
        return loss, {k: v.item() for k, v in parts.items()}

    def _routing_losses(self, states: dict[str, tuple[torch.Tensor, Segments]],
                        gen: torch.Generator, share: BatchShare) -> dict[str, torch.Tensor]:
        """§3.4's routing losses, as the authors build them: per record, two states from the
        same neighbourhood (its edit and rephrases; or its locality prompt), and for the
        prototype loss two from different ones. Over the whole batch: each process computes
        its rows' features and gathers the others', so every process computes the whole
        batch's losses (and the averaged gradients are theirs)."""
        nets = self.nets
        groups = {0: ("rel",), 1: ("t_gen", "m_gen"), 2: ("m_loc",)}
        b = share.size

        def pick(group: int) -> str:
            options = groups[group]
            return options[int(torch.randint(len(options), (1,), generator=gen))]

        def features(kinds: list[str], extractor: RoutingFeatures
                     ) -> tuple[torch.Tensor, torch.Tensor]:
            """(textual, visual) features of row j from the states of kind kinds[j]."""
            text, vision = [], []
            for kind in sorted(set(kinds)):
                reps, seg = states[kind]
                text.append((kind, share.gather(extractor.textual(reps, seg.question))))
                vision.append((kind, share.gather(extractor.visual(reps, seg.question,
                                                                   seg.vision))))
            t, v = dict(text), dict(vision)
            rows = torch.arange(b)
            return (torch.stack([t[k][j] for j, k in zip(rows.tolist(), kinds)]),
                    torch.stack([v[k][j] for j, k in zip(rows.tolist(), kinds)]))

        def prototype(kinds: list[str], visual: torch.Tensor) -> torch.Tensor:
            protos = {}
            for kind in sorted(set(kinds)):
                reps, seg = states[kind]
                protos[kind] = share.gather(nets.input_features.prototype_visual(reps,
                                                                                 seg.question))
            proto = torch.stack([protos[k][j] for j, k in enumerate(kinds)])
            return (visual * proto).sum(-1).mean(1, keepdim=True) * nets.sim_scale  # [b, 1]

        # neighbours: group 0/1 (the edit and its rephrases) or 2 (its locality prompt)
        first_groups = torch.randint(3, (b,), generator=gen).tolist()
        second_groups = [g if g == 2 else int(torch.randint(2, (1,), generator=gen))
                         for g in first_groups]
        first = [pick(g) for g in first_groups]
        second = [pick(g) for g in second_groups]
        in_text, in_vision = features(first, nets.input_features)
        ed_text, ed_vision = features(second, nets.edit_features)
        soft = soft_routing_loss(nets.similarity(in_text, ed_text))
        neighbour = neighbour_loss(nets.similarity(in_vision, ed_vision),
                                   prototype(first, in_vision))
        # prototype: the input and the "edit" come from different neighbourhoods of a record
        in_scope = torch.randint(2, (b,), generator=gen).tolist()
        first = [pick(int(torch.randint(2, (1,), generator=gen))) if s else pick(2)
                 for s in in_scope]
        second = [pick(2) if s else pick(int(torch.randint(2, (1,), generator=gen)))
                  for s in in_scope]
        _, in_vision = features(first, nets.input_features)
        _, ed_vision = features(second, nets.edit_features)
        outside = prototype_loss(nets.similarity(in_vision, ed_vision),
                                 prototype(first, in_vision))
        return {"soft_routing": soft, "hard_routing": neighbour + outside}

    # --- the hook ------------------------------------------------------------------------------

    @contextmanager
    def _hooked(self) -> Iterator[None]:
        """The hook on the edited layer, for as long as the block runs (restore() removes a
        hook that editing installed)."""
        installed = self._handle is None
        if installed:
            self._install()
        try:
            yield
        finally:
            if installed:
                self._remove()

    def _install(self) -> None:
        assert self.backbone is not None
        layer = self.backbone.modules.language_layer(self._resolve_layer(self.layer))
        self._handle = layer.register_forward_hook(self._hook)

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _run(self, prompts: list[Prompt], plan: Plan) -> tuple[ForwardOutput, Plan, ModelBatch]:
        assert self.backbone is not None
        batch = self.backbone.prepare(prompts)
        plan.segments = Segments.of(batch)
        self._plan = plan
        try:
            out = self.backbone.forward(batch)
        finally:
            self._plan = None
        return out, plan, batch

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        plan = self._plan
        if plan is None:
            return output
        out = output[0] if isinstance(output, tuple) else output
        reps = out.detach().float()  # the networks work in float32 whatever the backbone's dtype
        plan.captured.append(reps)   # the states before any expert (training's routing losses)
        if plan.capture:
            return output
        if plan.make_experts:
            plan.experts = self._experts(reps, plan.segments)
            if plan.share is not None:  # every process's experts, each row routed among them
                plan.experts = plan.experts.gathered(plan.share)
        if plan.experts is None or len(plan.experts) == 0:
            return output
        coefficients = self._coefficients(reps, plan)
        delta = self.nets.residual(reps, plan.experts.c, plan.experts.r, coefficients)
        out = out + delta.to(out.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def _experts(self, reps: torch.Tensor, seg: Segments | None) -> Experts:
        """§3.2: the experts and routing features of the edits whose states these are."""
        assert seg is not None
        nets = self.nets
        return Experts(text=nets.edit_features.textual(reps, seg.question),
                       vision=nets.edit_features.visual(reps, seg.question, seg.vision),
                       c=nets.expert_in(reps, seg.attended), r=nets.expert_out(reps, seg.attended))

    def _coefficients(self, reps: torch.Tensor, plan: Plan) -> torch.Tensor:
        """[b, n]: training gives the allowed experts; at inference hard routing picks them.
        In generation the first call (the whole prompt) routes; later calls (one new token
        each) keep its choice."""
        assert plan.experts is not None
        if plan.coefficients is not None and plan.segments is not None \
                and reps.shape[1] != plan.segments.attended.shape[1]:
            return plan.coefficients
        seg = plan.segments
        assert seg is not None
        nets = self.nets
        features = nets.input_features
        allowed = plan.allowed
        if allowed is None:  # inference: hard routing against the prototype (§3.3)
            visual = features.visual(reps, seg.question, seg.vision)
            scores = nets.similarity(visual, plan.experts.vision)
            proto = features.prototype_visual(reps, seg.question)
            sentinel = (visual * proto).sum(-1).mean(1, keepdim=True) * nets.sim_scale
            allowed = (scores > sentinel) & seg.has_image[:, None]
        text = features.textual(reps, seg.question)
        coefficients = soft_coefficients(nets.similarity(text, plan.experts.text), allowed)
        plan.coefficients = coefficients
        return coefficients

    # --- editing -------------------------------------------------------------------------------

    @torch.no_grad()
    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        prompts = [edit_prompts(r, self.templates)[0] for r in records]
        with self._hooked():
            _, plan, _ = self._run(prompts, Plan(capture=True))
        assert plan.segments is not None
        new = self._experts(plan.captured[0], plan.segments)
        self.repository = new if self.repository is None else self.repository.extended(new)
        if self._handle is None:
            self._install()
        return EditOutcome(ok=True, steps=0, extra={"experts": float(len(self.repository))})

    def restore(self) -> None:
        """Empty the repository and remove the hook: the backbone was never changed."""
        self.repository = None
        self._remove()

    def forward(self, batch: ModelBatch, output_hidden_states: bool = False) -> ForwardOutput:
        assert self.backbone is not None
        if self.repository is None:
            return self.backbone.forward(batch, output_hidden_states=output_hidden_states)
        self._plan = Plan(segments=Segments.of(batch), experts=self.repository)
        try:
            with torch.no_grad():
                return self.backbone.forward(batch, output_hidden_states=output_hidden_states)
        finally:
            self._plan = None

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy answers with the experts routed on each prompt (the same left-padded batch
        ``Backbone.generate`` builds)."""
        assert self.backbone is not None
        prompts = self.prepare_prompts(prompts)
        if self.repository is None:
            return self.backbone.generate(prompts, max_new_tokens=max_new_tokens)
        batch = self.backbone.collate([self.backbone.encode(p, with_target=False)
                                       for p in prompts]).to(self.backbone.device)
        self._plan = Plan(segments=Segments.of(batch), experts=self.repository)
        try:
            return self.backbone.generate(prompts, max_new_tokens=max_new_tokens)
        finally:
            self._plan = None


def _random_prefix(b: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """[b, b]: row i may also use the batch's first n_i experts, n_i uniform in 0..b (the
    authors' way of training with other edits present)."""
    counts = torch.randint(b + 1, (b,), generator=gen)
    return (torch.arange(b)[None, :] < counts[:, None]).to(device)
