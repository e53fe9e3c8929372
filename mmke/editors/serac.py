"""SERAC: an edit memory, a scope classifier and a counterfactual model, trained once.

Mitchell, Lin, Bosselut, Manning and Finn, "Memory-Based Model Editing at Scale" (ICML 2022).
The backbone never changes. ``edit`` writes each edit (its prompt, picture and new target) into a
memory; ``restore`` empties it. An input the scope classifier places in the scope of a stored edit
(the best edit's score g > ``threshold``, 0.5 in the paper and EasyEdit) is answered by the
counterfactual model with that edit in its context; every other input reaches the unchanged
backbone, whose logits it gets bit for bit (``forward``: one backbone forward for the whole batch,
one counterfactual forward for its in-scope rows; ``generate``: the same routing).
The networks are in ``mmke.editors.serac_scope`` and ``mmke.editors.serac_counterfactual``.

Training (``fit``, once per backbone, task and settings, cached by ``TrainedEditor``). Each train
record is one single-edit episode, as in EasyEdit's multimodal trainer (batch size 1 there): the
memory holds the record's edit e (its question, picture and ``alt``), and the in-scope inputs are
its text rephrase x_t and image rephrase x_m (target ``alt``), the out-of-scope ones its text and
multimodal locality prompts l_t, l_m. With s = g(e, x) and the soft mixture
p_mix(.|x) = (1 - s) p_base(.|x) + s p_cf(.|e, x) that EasyEdit trains through:

    L = edit_weight * NLL_mix(x_t) + image_weight * NLL_mix(x_m)
        + loc_weight * (KL(p_base || p_mix)(l_t) + KL(p_base || p_mix)(l_m))
        + cls_weight * L_cls

NLL over the target tokens, KL over every attended position (EasyEdit's ``kl_loc_loss``); the
defaults 0.1 / 0.1 / 1.0 are EasyEdit's cedit / iedit / cloc. L_cls is the scope classifier's own
loss, which EasyEdit's multimodal trainer leaves out (it trains the classifier only through the
mixture; VLKEB issue #17), and the original SERAC's SupervisedTrainer has: the balanced binary
cross-entropy of ``losses.balanced_bce``, -mean_pos log g - mean_neg log(1 - g), over
(input, edit) pairs of the batch. A pair is positive when the input's question is a phrasing of
the edit's question (the edit prompt, its rephrases, the same question on another picture),
negative otherwise (the other records' questions, every locality prompt); ``cross_negatives``
false keeps only each record's own pairs. A multimodal locality prompt that asks a phrasing of
the edit's own question (the mini world's questions repeat over pictures) is in the edit's scope
for a text classifier, so it is a positive pair for L_cls and left out of the KL term. Under
``accelerate launch`` each process scores its share of the inputs against every edit of the batch
(the edits' embeddings gathered with their gradients, ``BatchShare.gather``) and weighs its means
by the shares, so two processes fit the networks one process fits.

Regularizers: SERAC has no loss-based edit step and changes no layer of the backbone, and the
papers run it with reg=none only (ODEdit and ASAM Table 1). ODEdit's and ASAM's terms read the
edited model's hidden states at the layer an editor changes (MMD, RCSL) and the risk of its edit
step (IRM-TV), none of which SERAC has; ODEdit's KL locality is SERAC's own loc term already.
So ``reg=odedit`` and ``reg=asam`` are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmke.backbones.base import IGNORE_INDEX, Backbone, ForwardOutput, ModelBatch
from mmke.data.prompts import PromptTemplates, edit_prompts
from mmke.data.record import EditRecord, Prompt
from mmke.editors.base import EditOutcome
from mmke.editors.serac_counterfactual import (BACKBONE, INITS, CounterfactualModel,
                                               load_counterfactual_lm)
from mmke.editors.serac_scope import ScopeClassifier, load_text_encoder
from mmke.editors.training import BatchShare, TrainedEditor, TrainingSettings
from mmke.encoders.sentence import MODEL_NAME as MINILM, SentenceEncoder
from mmke.errors import ConfigError, check_choice
from mmke.regularizers.base import Regularizer, TrainRecords, edit_request


class SeracNetworks(nn.Module):
    """What ``fit`` trains: the scope classifier and the counterfactual model."""

    def __init__(self, classifier: ScopeClassifier, counterfactual: CounterfactualModel) -> None:
        super().__init__()
        self.classifier = classifier
        self.counterfactual = counterfactual

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The state with tied weights (OPT's LM head is its token embedding) as separate
        copies: safetensors refuses tensors that share memory. Loading writes both keys into
        the one tied parameter, with equal values."""
        state = super().state_dict(*args, **kwargs)
        seen: set[int] = set()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                if value.data_ptr() in seen:
                    state[key] = value.clone()
                seen.add(value.data_ptr())
        return state


@dataclass
class EditMemory:
    """The edits of the stream so far: classifier embeddings ``[M, d]`` and each edit's context
    (token ids of its prompt and new target, text only, as the backbone tokenizes them)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    contexts: list[list[int]] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.contexts)

    def clear(self) -> None:
        self.keys.clear()
        self.contexts.clear()
        self.prompts.clear()


def balanced_bce(log_scores: torch.Tensor, labels: torch.Tensor,
                 share: BatchShare | None = None) -> torch.Tensor:
    """The scope classifier's loss (SERAC's ``balanced_bce``): mean of -log g over positive
    pairs plus mean of -log(1 - g) over negative ones; g = exp(log_scores) in (0, 1].
    ``share``: the pairs are this process's part of a batch split over processes; the means are
    then the whole batch's (each process's part weighed by its count of pairs)."""
    share = share or BatchShare()  # one process: its pairs are all of them
    positive, negative = labels.bool(), ~labels.bool()
    counts = torch.tensor([int(positive.sum()), int(negative.sum())], device=log_scores.device)
    # the whole batch's counts decide which terms exist, alike in every process
    totals = share.gather_all(counts).sum(0).tolist()
    loss = log_scores.new_zeros(())
    if totals[0]:
        part = log_scores[positive].mean() if positive.any() else log_scores.new_zeros(())
        loss = loss - share.item_mean(part, int(counts[0]), totals[0])
    if totals[1]:
        # log(1 - exp(x)) for x <= 0, stable; clamped so that g = 1 exactly stays finite
        part = (torch.log(-torch.expm1(log_scores[negative].clamp(max=-1e-6))).mean()
                if negative.any() else log_scores.new_zeros(()))
        loss = loss - share.item_mean(part, int(counts[1]), totals[1])
    return loss


class Serac(TrainedEditor):
    """SERAC over any backbone of the harness.

    Classifier: ``classifier`` (a folder or hub id of a transformers encoder, EasyEdit's
    distilbert-base-cased; or ``all-MiniLM-L6-v2``, the offline copy of mmke.encoders),
    ``classifier_pooling`` (cls | mean), ``classifier_normalize`` (L2-normalise the pooled
    embedding), ``train_classifier_encoder`` (fine-tune the encoder, as EasyEdit does, or keep it
    frozen), ``classifier_head_dim`` (a linear head on top; None: none), ``classifier_lr`` (its
    Adam learning rate; None: ``training.lr``), ``threshold`` (in scope when g > it).
    Counterfactual model: ``counterfactual`` (a folder or hub id of a causal LM sharing the
    backbone's tokenizer, EasyEdit's facebook/opt-125m for BLIP-2; or ``backbone``, the
    backbone's own language model), ``counterfactual_init`` (``pretrained``: its weights;
    ``random``: its architecture alone, freshly initialised), ``counterfactual_trainable_layers``
    (None: the counterfactual model trains whole; N: it is the backbone's own language model of
    which only the last N decoder layers are copied and trained, everything else shared and
    frozen, as EasyEdit's MiniGPT-4 SERAC trains only Vicuna's last layer; needs
    ``counterfactual=backbone`` and ``counterfactual_init=pretrained``). Loss weights:
    ``edit_weight``, ``image_weight``, ``loc_weight``, ``cls_weight``; ``cross_negatives``: score
    every (input, edit) pair of a batch in L_cls, not only each record's own.
    ``local_files_only``: never reach a model hub. ``training``: ``TrainingSettings``;
    ``cache_dir``: where the trained networks are kept.
    """

    accepts_regularizer = False
    # 2: counterfactual_init=random no longer copies the backbone's language model first, which on
    # LLaVA and Qwen2-VL drew random weights and so moved the seed the fresh model starts from
    code_version = "2"

    def __init__(self, classifier: str = "distilbert-base-cased", classifier_pooling: str = "cls",
                 classifier_normalize: bool = False, train_classifier_encoder: bool = True,
                 classifier_head_dim: int | None = None, classifier_lr: float | None = None,
                 counterfactual: str = "facebook/opt-125m", counterfactual_init: str = "pretrained",
                 counterfactual_trainable_layers: int | None = None, threshold: float = 0.5,
                 edit_weight: float = 0.1, image_weight: float = 0.1, loc_weight: float = 1.0,
                 cls_weight: float = 1.0, cross_negatives: bool = True,
                 local_files_only: bool = True,
                 training: TrainingSettings | Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, progress: bool = True,
                 regularizer: Regularizer | None = None, name: str = "serac") -> None:
        super().__init__(training=training, cache_dir=cache_dir, progress=progress,
                         regularizer=regularizer, name=name)
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"editor.threshold={threshold!r} must lie in (0, 1)")
        for setting, value in (("edit_weight", edit_weight), ("image_weight", image_weight),
                               ("loc_weight", loc_weight), ("cls_weight", cls_weight)):
            if value < 0:
                raise ConfigError(f"editor.{setting}={value!r} must be >= 0")
        if classifier_lr is not None and not classifier_lr > 0:
            raise ConfigError(f"editor.classifier_lr={classifier_lr!r} must be > 0 or null")
        if classifier_head_dim is not None and classifier_head_dim < 1:
            raise ConfigError(f"editor.classifier_head_dim={classifier_head_dim!r} must be >= 1")
        if not train_classifier_encoder and classifier_head_dim is None:
            raise ConfigError("a frozen classifier encoder (editor.train_classifier_encoder=false) "
                              "needs a head to train: set editor.classifier_head_dim")
        self.classifier, self.classifier_pooling = classifier, classifier_pooling
        self.classifier_normalize = classifier_normalize
        self.train_classifier_encoder = train_classifier_encoder
        self.classifier_head_dim, self.classifier_lr = classifier_head_dim, classifier_lr
        check_choice("editor.counterfactual_init", counterfactual_init, INITS)
        self.counterfactual, self.counterfactual_init = counterfactual, counterfactual_init
        layers = counterfactual_trainable_layers
        if layers is not None:
            if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
                raise ConfigError(f"editor.counterfactual_trainable_layers={layers!r} must be a "
                                  "whole number >= 1, or null (the counterfactual model trains "
                                  "whole)")
            if counterfactual != BACKBONE or counterfactual_init != "pretrained":
                raise ConfigError(
                    f"editor.counterfactual_trainable_layers={layers} trains the last layers of "
                    "the backbone's own language model and shares the rest with it: it needs "
                    "editor.counterfactual=backbone and editor.counterfactual_init=pretrained "
                    f"(got {counterfactual!r} and {counterfactual_init!r})")
        self.counterfactual_trainable_layers = layers
        self.threshold = threshold
        self.edit_weight, self.image_weight = edit_weight, image_weight
        self.loc_weight, self.cls_weight = loc_weight, cls_weight
        self.cross_negatives, self.local_files_only = cross_negatives, local_files_only
        self.memory = EditMemory()
        #: question phrasings of the train split: scope text -> its question's class
        self._question_class: dict[str, str] = {}
        self._scope_memo: dict[tuple[str, bool], str] = {}
        self._built: SeracNetworks | None = None

    # --- setup -------------------------------------------------------------------------------------

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        if self.regularizer.active:
            raise ConfigError(
                f"editor=serac cannot take reg={type(self.regularizer).__name__.lower()}: SERAC "
                "never optimises the backbone at edit time (an edit is written into a memory), so "
                "there is no edit step, edit layer or trainable parameter for the regularizer's "
                "terms (ODEdit's MMD and IRM-TV, ASAM's RCSL) to act on, and its training "
                "objective already holds the KL locality term; the papers run SERAC with "
                "reg=none. Use reg=none.")
        layers, total = self.counterfactual_trainable_layers, backbone.modules.num_language_layers
        if layers is not None and layers > total:
            raise ConfigError(f"editor.counterfactual_trainable_layers={layers}: the backbone's "
                              f"language model has {total} decoder layers")
        super().attach(backbone, templates, train_records)
        self.memory.clear()
        self._scope_memo.clear()

    def cache_settings(self) -> dict[str, Any]:
        settings = {k: getattr(self, k) for k in (
            "classifier", "classifier_pooling", "classifier_normalize", "train_classifier_encoder",
            "classifier_head_dim", "classifier_lr", "counterfactual", "counterfactual_init",
            "edit_weight",
            "image_weight", "loc_weight", "cls_weight", "cross_negatives")}
        if self.counterfactual_trainable_layers is not None:
            # only when set: the fits made before the setting existed keep their keys
            settings["counterfactual_trainable_layers"] = self.counterfactual_trainable_layers
        if self.classifier == MINILM and self.cache_dir is not None:
            settings["classifier_weights"] = SentenceEncoder(
                self.cache_dir, device="cpu", progress=False).fingerprint
        settings["templates"] = [self.templates.edit, self.templates.m_loc, self.templates.t_loc]
        return settings

    def build_networks(self, train_records: Sequence[EditRecord]) -> nn.Module:
        assert self.backbone is not None
        self._question_class = self._phrasings(train_records)
        encoder = load_text_encoder(self.classifier, self.classifier_pooling,
                                    self.classifier_normalize, self.cache_dir,
                                    self.local_files_only)
        scope = ScopeClassifier(encoder, self.train_classifier_encoder, self.classifier_head_dim)
        if self.counterfactual_trainable_layers is None:
            lm = load_counterfactual_lm(self.counterfactual, self.backbone,
                                        self.counterfactual_init, self.local_files_only)
            counterfactual = CounterfactualModel(lm, self._vision_dim())
        else:
            lm, top = self.backbone.language_model_top_copy(self.counterfactual_trainable_layers)
            counterfactual = CounterfactualModel(lm, self._vision_dim(), top_layers=top)
        self._built = SeracNetworks(scope, counterfactual)
        return self._built

    def optimizer_groups(self, networks: nn.Module) -> list[dict[str, Any]]:
        assert isinstance(networks, SeracNetworks)
        classifier = [p for p in networks.classifier.parameters() if p.requires_grad]
        counterfactual = [p for p in networks.counterfactual.parameters() if p.requires_grad]
        return [{"params": classifier, "lr": self.classifier_lr or self.training.lr},
                {"params": counterfactual, "lr": self.training.lr}]

    def _vision_dim(self) -> int:
        """Width of the backbone's language-space image features (its language model's)."""
        assert self.backbone is not None
        return int(self.backbone.decoder.get_input_embeddings().embedding_dim)

    def _phrasings(self, records: Sequence[EditRecord]) -> dict[str, str]:
        """Scope text of every phrasing of every train question (its ``src`` and ``rephrase``,
        with and without a picture) -> the question's class (its ``src``)."""
        out: dict[str, str] = {}
        t = self.templates
        for r in records:
            for question in (r.src, r.rephrase):
                for template in {t.edit, t.m_loc}:
                    for image in (r.image, None):
                        text = self.scope_text(Prompt(template.format(question), r.alt, image))
                        out.setdefault(text, r.src)
        return out

    # --- what the classifier reads ---------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        assert self.backbone is not None
        image = self.backbone.image_token_id
        return self.backbone.tokenizer.decode([i for i in ids if i != image],
                                              skip_special_tokens=True).strip()

    def scope_text(self, prompt: Prompt) -> str:
        """What the classifier reads of a prompt: its text as the backbone tokenizes it (family
        template included), image tokens and special tokens dropped, no target. The same text
        ``batch_scope_texts`` recovers from a batch row, so edits, training inputs and scored
        prompts are read alike."""
        key = (prompt.text, prompt.image is not None)
        if key not in self._scope_memo:
            assert self.backbone is not None
            ids = self.backbone.encode(prompt, with_target=False).input_ids
            self._scope_memo[key] = self._decode(ids)
        return self._scope_memo[key]

    def batch_scope_texts(self, batch: ModelBatch) -> list[str]:
        """The scope text of each row of a batch: its attended tokens before the first labelled
        (target) position."""
        labelled = (batch.labels != IGNORE_INDEX).cpu()
        attended = batch.attention_mask.bool().cpu()
        ids = batch.input_ids.cpu()
        texts = []
        for r in range(len(batch)):
            targets = labelled[r].nonzero()
            end = int(targets[0]) if len(targets) else ids.shape[1]
            texts.append(self._decode(ids[r, :end][attended[r, :end]].tolist()))
        return texts

    # --- training -------------------------------------------------------------------------------

    def training_loss(self, batch: Sequence[EditRecord], step: int
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        backbone, nets = self.backbone, self.networks_in_training
        assert backbone is not None
        # this process's records of the step's batch (one process: all of it). The classifier's
        # pairs span the whole batch (every process's edit embeddings, gathered with their
        # gradients) and the means are weighed by the shares, so the processes' averaged
        # gradient is the one-process gradient
        share = self.share_of(batch)
        n = len(batch)
        per_record = [edit_prompts(r, self.templates) for r in batch]
        edits = [p[0] for p in per_record]
        # inputs grouped by kind: rephrase, image rephrase, text locality, multimodal locality
        inputs = [per_record[i][k] for k in (1, 2, 3, 4) for i in range(n)]
        owner = torch.tensor(share.positions).repeat(4)     # each input's edit in the batch
        kind = torch.arange(4).repeat_interleave(n)
        own_texts = [self.scope_text(p) for p in edits]
        edit_texts = share.gather_objects(own_texts)        # every edit of the batch, in order
        input_texts = [self.scope_text(p) for p in inputs]
        device = backbone.device
        log_g = ScopeClassifier.log_scores(nets.classifier(input_texts),
                                           share.gather(nets.classifier(own_texts)))  # [4n, size]
        same = torch.tensor([[self._same_question(x, e) for e in edit_texts]
                             for x in input_texts], device=log_g.device)
        pairs = (torch.ones_like(same) if self.cross_negatives
                 else torch.nn.functional.one_hot(owner, share.size).bool().to(log_g.device))
        l_cls = balanced_bce(log_g[pairs], same[pairs], share)
        s = log_g[torch.arange(4 * n), owner].exp().to(device)                # g(e_i, x)

        prompts = backbone.prepare(inputs)
        with torch.no_grad():
            rows = backbone.image_rows(prompts) if prompts.pixel_values is not None else None
            base = backbone.forward(prompts, inputs_embeds=backbone.embed(prompts, rows)).logits
        contexts = [self._context(edits[i]) for i in range(n)] * 4
        cf = nets.counterfactual(contexts, prompts, rows)
        log_mix = torch.logaddexp((1 - s).clamp(min=1e-12).log()[:, None, None]
                                  + base.float().log_softmax(-1),
                                  s.clamp(min=1e-12).log()[:, None, None] + cf.log_softmax(-1))
        nll = self._nll(prompts, log_mix)                                        # per row
        kl = self._kl(prompts, base.float().log_softmax(-1), log_mix)            # per row
        kind = kind.to(device)
        textual = same[torch.arange(4 * n), owner].to(device)   # locality prompts in scope by text
        loc_t = share.row_mean(kl[kind == 2])
        keep_m = (kind == 3) & ~textual
        # a mean over the whole batch's kept prompts, whose count differs between the processes
        loc_m = share.item_mean(kl[keep_m].mean() if keep_m.any() else kl.new_zeros(()),
                                int(keep_m.sum()))
        nll_t, nll_m = share.row_mean(nll[kind == 0]), share.row_mean(nll[kind == 1])
        loss = (self.edit_weight * nll_t + self.image_weight * nll_m
                + self.loc_weight * (loc_t + loc_m) + self.cls_weight * l_cls.to(device))
        with torch.no_grad():
            g_in = s[kind <= 1].mean()
            g_out = s[(kind >= 2) & ~textual].mean()
        return loss, {"nll": nll_t.item(), "nll_img": nll_m.item(), "kl": (loc_t + loc_m).item(),
                      "cls": l_cls.item(), "g_in": g_in.item(), "g_out": g_out.item()}

    @property
    def networks_in_training(self) -> SeracNetworks:
        """The networks ``fit`` is training: the ones ``build_networks`` built last."""
        if self._built is None:
            raise RuntimeError("training_loss runs inside fit, after build_networks")
        return self._built

    def _same_question(self, text: str, edit_text: str) -> bool:
        return (text == edit_text
                or self._question_class.get(text, text) == self._question_class.get(edit_text,
                                                                                    edit_text))

    @staticmethod
    def _nll(batch: ModelBatch, log_probs: torch.Tensor) -> torch.Tensor:
        """Per row: mean -log p of the target tokens (0 for a row without targets)."""
        targets = batch.labels[:, 1:]
        mask = (targets != IGNORE_INDEX).to(log_probs.device)
        picked = log_probs[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1).to(
            log_probs.device)).squeeze(-1)
        return -(picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    @staticmethod
    def _kl(batch: ModelBatch, log_ref: torch.Tensor, log_post: torch.Tensor) -> torch.Tensor:
        """Per row: mean over attended positions of KL(p_ref || p_post) (EasyEdit's
        ``kl_loc_loss``, whole sequence)."""
        mask = batch.attention_mask.to(log_ref.device).float()
        kl = (log_ref.exp() * (log_ref - log_post)).sum(-1)
        return (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    # --- editing ------------------------------------------------------------------------------------

    def _context(self, prompt: Prompt) -> list[int]:
        """The edit as the counterfactual model reads it before an input: the backbone's ids of
        the edit prompt and its new target, without the picture."""
        assert self.backbone is not None
        return list(self.backbone.encode(Prompt(prompt.text, prompt.target, None, prompt.kind),
                                         with_target=True).input_ids)

    def _networks(self) -> SeracNetworks:
        if not isinstance(self.networks, SeracNetworks):
            raise RuntimeError("editor=serac edits with trained networks: call fit(train_records) "
                               "after attach (the runner does)")
        return self.networks

    @torch.no_grad()
    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        """Write each record's edit (prompt, picture, new target) into the memory."""
        nets = self._networks()
        prompts = [edit_request(r, self.templates).prompt for r in records]
        keys = nets.classifier([self.scope_text(p) for p in prompts])
        for prompt, key in zip(prompts, keys):
            self.memory.keys.append(key)
            self.memory.contexts.append(self._context(prompt))
            self.memory.prompts.append(prompt)
        return EditOutcome(ok=True, steps=0, extra={"memory_size": float(len(self.memory))})

    def restore(self) -> None:
        """Empty the memory; the backbone was never changed."""
        self.memory.clear()

    @torch.no_grad()
    def route(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each scope text: the best edit's score g and its memory index (ties go to the
        latest edit, which overrides earlier ones). Empty memory: scores 0."""
        if not self.memory:
            return torch.zeros(len(texts)), torch.zeros(len(texts), dtype=torch.long)
        nets = self._networks()
        scores = ScopeClassifier.log_scores(nets.classifier(list(texts)),
                                            torch.stack(self.memory.keys)).exp().cpu()
        best, flipped = scores.flip(-1).max(-1)
        return best, len(self.memory) - 1 - flipped

    def in_scope(self, texts: Sequence[str]) -> list[int | None]:
        """The memory index of the edit each text is routed to, or None (the backbone)."""
        scores, index = self.route(texts)
        return [int(i) if float(g) > self.threshold else None for g, i in zip(scores, index)]

    # --- the edited model ------------------------------------------------------------------------------

    def forward(self, batch: ModelBatch, output_hidden_states: bool = False) -> ForwardOutput:
        """One backbone forward for the batch; rows in the scope of a stored edit take the
        counterfactual model's logits (one forward for all of them), the others keep the
        backbone's, bit for bit. Hidden states, when asked, are the backbone's."""
        backbone = self.backbone
        assert backbone is not None
        if not self.memory:
            return backbone.forward(batch, output_hidden_states=output_hidden_states)
        rows = backbone.image_rows(batch) if batch.pixel_values is not None else None
        out = backbone.forward(batch, inputs_embeds=backbone.embed(batch, rows),
                               output_hidden_states=output_hidden_states)
        routed = self.in_scope(self.batch_scope_texts(batch))
        chosen = [r for r, m in enumerate(routed) if m is not None]
        if not chosen:
            return out
        nets = self._networks()
        sub = _select(batch, chosen)
        sub_rows = _select_image_rows(batch, rows, chosen)
        with torch.no_grad():
            cf = nets.counterfactual([self.memory.contexts[routed[r]] for r in chosen], sub,
                                     sub_rows)
        logits = out.logits.clone()
        logits[torch.tensor(chosen, device=logits.device)] = cf.to(logits.dtype)
        return ForwardOutput(logits, out.hidden_states)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy answers through the same route: out-of-scope prompts from the backbone (one
        batch), in-scope ones from the counterfactual model with their edit (one batch)."""
        backbone = self.backbone
        if backbone is None:
            raise RuntimeError("attach(backbone, templates) before generate()")
        prompts = list(prompts)
        if not self.memory:
            return backbone.generate(prompts, max_new_tokens=max_new_tokens)
        routed = self.in_scope([self.scope_text(p) for p in prompts])
        answers: list[str] = [""] * len(prompts)
        base = [i for i, m in enumerate(routed) if m is None]
        if base:
            for i, a in zip(base, backbone.generate([prompts[i] for i in base],
                                                    max_new_tokens=max_new_tokens)):
                answers[i] = a
        chosen = [i for i, m in enumerate(routed) if m is not None]
        if chosen:
            contexts = [self.memory.contexts[routed[i]] for i in chosen]
            for i, a in zip(chosen, self._networks().counterfactual.generate(
                    contexts, [prompts[i] for i in chosen], backbone, max_new_tokens)):
                answers[i] = a
        return answers


def _select(batch: ModelBatch, rows: Sequence[int]) -> ModelBatch:
    """The batch's ``rows`` (their own images re-indexed; ``pixel_values`` kept whole)."""
    index = torch.tensor(list(rows), device=batch.input_ids.device)
    has_image = batch.image_token_mask.any(-1).cpu()
    ordinal = has_image.long().cumsum(0) - 1            # position of each image row in image_index
    keep = [int(ordinal[r]) for r in rows if bool(has_image[r])]
    image_index = batch.image_index[torch.tensor(keep, dtype=torch.long,
                                                 device=batch.image_index.device)]
    return ModelBatch(batch.input_ids[index], batch.attention_mask[index], batch.labels[index],
                      batch.image_token_mask[index], batch.pixel_values if keep else None,
                      image_index, batch.image_grid_thw if keep else None)


def _select_image_rows(batch: ModelBatch, image_rows: torch.Tensor | None,
                       rows: Sequence[int]) -> torch.Tensor | None:
    """The image features (row-major over image positions) of the selected rows only."""
    if image_rows is None:
        return None
    per_row = batch.image_token_mask.sum(-1).cpu().tolist()
    starts = [0]
    for count in per_row:
        starts.append(starts[-1] + count)
    parts = [image_rows[starts[r]:starts[r + 1]] for r in rows if per_row[r]]
    return torch.cat(parts) if parts else None
