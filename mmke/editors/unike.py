"""UniKE (Pan et al., "Towards Unified Multimodal Editing with Enhanced Knowledge Collaboration",
NeurIPS 2024, arXiv 2409.19872): intrinsic knowledge as trained FFN neurons, external knowledge
as latent in-context key–value vectors, both in the last language layers, and the two made to
collaborate through a semantic and a truthfulness space learned by contrastive pre-training.

The paper is the specification (the authors' public code implements only the neurons); its
method section could not be read here, so this follows the digest in EDITORS.md, and the
equations are named, not numbered (``mmke.editors.unike_nets`` says what was chosen where the
digest leaves a choice). Per knowledge layer l of ``layers`` (the paper's last 4):

- **Intrinsic knowledge** (the paper's "assimilation"): T-Patcher's key–value neurons beside the
  FFN of layer l (``mmke.editors.neurons.NeuronPatch``, one per layer, one block per edit,
  older blocks frozen). Keys start at the edit's FFN queries q/‖q‖² (at most ``n_neurons`` per
  layer, one per position that predicts a target token), biases at 0, values at the truthfulness
  steering β·ζ′ (below). Trained per edit with the NLL of the new target plus T-Patcher's
  activation loss (the neuron fires on its edit query) and memory loss (it stays silent on
  train-split out-of-scope prompts and on the stream's earlier edits, margins as T-Patcher's):
  ``neurons.patch_losses``. The paper trains the neurons with the edit loss; the activation and
  memory losses are T-Patcher's, kept because without them a neuron fires on unrelated inputs
  (``act_weight=0, memory_weight=0`` turns them off). Adam on the new neurons only.
- **External knowledge** ("accommodation"): each edit adds (h_sem, h_pos) to a memory of layer l:
  the self-attention output at the question's last token, and at the last token of question +
  new answer, computed with the blend off. A forward hook on the self-attention of layer l
  retrieves, at every position, the top-K pairs by cosine (``unike_nets.latent_knowledge``),
  attends over their h_pos (h_know) and returns α·h + (1 − α)·h_know.
- **Knowledge collaboration**: Enc_Sem and Enc_Tru (MLPs per layer) are pre-trained once on
  triplets (question, new answer, the model's own answer) of the TRAIN split with contrastive
  losses (Adam 1e-4; ``TrainedEditor``: cached on disk, resumable). On the mini world the
  triplet is (src, alt, pred): the pretrained tiny model answers ``pred``, which the edit makes
  wrong, and ``alt`` is the fact the edit makes true. Semantic space → α (how much in-context
  knowledge an input takes); truthfulness space → ζ′ = W_ζ(mean Tru_pos − mean Tru_neg), the
  initial value of the new neurons scaled by β (``truth_beta``; the paper gives no value), with
  Tru_pos over the h_pos the edit's question retrieves and Tru_neg the running mean over the
  train split's wrong-answer states.

Protocols: neurons and memory accumulate over a stream; a call whose loss turns non-finite
undoes its edits. ``restore`` removes every hook, neuron and memory entry: the backbone was never
changed. No leakage: an edit sees its edit request only; out-of-scope prompts come from the train
split (``TrainPool``, never a prompt scored for the record), and the encoders never see eval
records. Regularizers (``reg=odedit``, ``reg=asam``) enter through the seam as in T-Patcher,
with the new neurons as trainable parameters; they do not change the encoders' training, so
UniKE and UniKE+ODEdit share one fit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mmke.backbones.base import ModelBatch
from mmke.data.prompts import PromptTemplates, edit_prompts
from mmke.data.record import EditRecord, Prompt
from mmke.editors.base import EditOutcome
from mmke.editors.neurons import (ACTIVATIONS, NeuronPatch, PatchMargins, ffn_inputs_at,
                                  patch_losses, train_neurons)
from mmke.editors.snapshot import only_trainable
from mmke.editors.training import TrainedEditor
from mmke.editors.unike_nets import (UniKENetworks, alpha, blend, direction_loss,
                                     latent_knowledge, semantic_loss, steering,
                                     truthfulness_loss)
from mmke.errors import ConfigError, check_choice
from mmke.regularizers.base import (EditRequest, NoRegularizer, Regularizer, TrainRecords,
                                    edit_request, prompt_key)
from mmke.regularizers.pool import TrainPool


class UniKE(TrainedEditor):
    """``editor=unike``.

    ``layers``: the knowledge layers (negative: from the end); per layer ``n_neurons`` at most
    per edit; ``activation``, ``lr``, ``steps``, ``weight_decay``, ``early_stop_loss``,
    ``act_weight``, ``memory_weight``, ``act_margin``, ``memory_margin``, ``gap_margin``,
    ``memory_prompts``, ``memory_topk``, ``remember_edits``, ``append_eos``: the neurons'
    training, as T-Patcher's settings; ``top_k``: K of the latent retrieval; ``latent``: use the
    external knowledge at all; ``relevance_threshold``: τ of α; ``truth_beta``: β of the
    steering; ``encoder_width``, ``encoder_dim``: the encoders' MLPs; ``temperature``: the
    contrastive losses'; ``direction_weight``: W_ζ's loss in the pre-training objective.
    """

    accepts_regularizer = True
    code_version = "1"

    def __init__(self, layers: Sequence[int] = (-4, -3, -2, -1), n_neurons: int = 10,
                 activation: str = "relu", lr: float = 1e-2, steps: int = 25,
                 weight_decay: float = 0.01, early_stop_loss: float | None = None,
                 act_weight: float = 1.0, memory_weight: float = 5.0, act_margin: float = 0.0,
                 memory_margin: float = -3.0, gap_margin: float = 3.0,
                 memory_prompts: int = 20, memory_topk: int = 1000,
                 remember_edits: bool = True, append_eos: bool = False, top_k: int = 40,
                 latent: bool = True, relevance_threshold: float = 0.0, truth_beta: float = 1.0,
                 encoder_width: int = 1024, encoder_dim: int = 256, temperature: float = 0.1,
                 direction_weight: float = 1.0, seed: int = 0, training: Any = None,
                 cache_dir: str | None = None, progress: bool = True,
                 regularizer: Regularizer | None = None, name: str = "unike") -> None:
        super().__init__(training=training, cache_dir=cache_dir, progress=progress,
                         regularizer=regularizer, name=name)
        check_choice("editor.activation", activation, tuple(ACTIVATIONS))
        if not list(layers):
            raise ConfigError("editor.layers is empty: UniKE needs at least one knowledge layer")
        for setting, value in (("n_neurons", n_neurons), ("steps", steps), ("top_k", top_k),
                               ("memory_topk", memory_topk), ("encoder_width", encoder_width),
                               ("encoder_dim", encoder_dim)):
            if value < 1:
                raise ConfigError(f"editor.{setting}={value!r} must be >= 1")
        for setting, value in (("lr", lr), ("temperature", temperature)):
            if not value > 0:
                raise ConfigError(f"editor.{setting}={value!r} must be > 0")
        for setting, value in (("weight_decay", weight_decay), ("act_weight", act_weight),
                               ("memory_weight", memory_weight),
                               ("memory_prompts", memory_prompts), ("truth_beta", truth_beta),
                               ("direction_weight", direction_weight)):
            if value < 0:
                raise ConfigError(f"editor.{setting}={value!r} must be >= 0")
        if not 0.0 <= relevance_threshold < 1.0:
            raise ConfigError(f"editor.relevance_threshold={relevance_threshold!r} must be in "
                              "[0, 1)")
        self.layers = [int(layer) for layer in layers]
        self.n_neurons, self.activation = n_neurons, activation
        self.lr, self.steps, self.weight_decay = lr, steps, weight_decay
        self.early_stop_loss = early_stop_loss
        self.act_weight, self.memory_weight = act_weight, memory_weight
        self.margins = PatchMargins(act_margin, memory_margin, gap_margin, memory_topk)
        self.memory_prompts, self.remember_edits = memory_prompts, remember_edits
        self.append_eos, self.top_k, self.latent = append_eos, top_k, latent
        self.relevance_threshold, self.truth_beta = relevance_threshold, truth_beta
        self.encoder_width, self.encoder_dim = encoder_width, encoder_dim
        self.temperature, self.direction_weight, self.seed = temperature, direction_weight, seed
        self.patches: list[NeuronPatch] = []
        self.pool: TrainPool | None = None
        #: the latent memory, per knowledge layer: h_sem and h_pos rows, one per edit
        self.sem: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []
        #: (prompt fingerprint, FFN inputs per knowledge layer) of each edit of the stream so far
        self.remembered: list[tuple[str, list[torch.Tensor]]] = []
        self._handles: list[RemovableHandle] = []
        self._blend_on = True

    # --- setup -------------------------------------------------------------------------------

    def attach(self, backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        super().attach(backbone, templates, train_records)
        self.restore()
        self._layers = []
        for layer in self.layers:
            try:
                self._layers.append(backbone.modules.resolve_layer(layer))
            except IndexError as err:
                raise ConfigError(f"editor.layers={self.layers}: {err}") from err
        if len(set(self._layers)) != len(self._layers):
            raise ConfigError(f"editor.layers={self.layers} names a layer twice")
        mods = backbone.modules
        self.patches = [NeuronPatch(mods.ffn_in(i), mods.ffn_out(i), self.activation)
                        for i in self._layers]
        self.pool = None
        if self.memory_prompts > 0:
            if train_records is None:
                raise ConfigError(
                    "editor=unike draws its neurons' memory set from the train split "
                    f"(editor.memory_prompts={self.memory_prompts}); attach it with "
                    "train_records, or set editor.memory_prompts=0")
            self.pool = TrainPool(train_records, templates, seed=self.seed)

    @property
    def nets(self) -> UniKENetworks:
        assert isinstance(self.networks, UniKENetworks), "fit() before editing"
        return self.networks

    # --- the pre-training stage (TrainedEditor) ------------------------------------------------

    def cache_settings(self) -> dict[str, Any]:
        return {"layers": self._layers, "encoder_width": self.encoder_width,
                "encoder_dim": self.encoder_dim, "temperature": self.temperature,
                "direction_weight": self.direction_weight}

    def build_networks(self, train_records: Sequence[EditRecord]) -> nn.Module:
        assert self.backbone is not None
        hidden = self.backbone.decoder.get_input_embeddings().weight.shape[1]
        return UniKENetworks(len(self._layers), hidden, self.encoder_width, self.encoder_dim)

    def networks_trained(self) -> None:
        self.nets.requires_grad_(False)  # frozen while editing: only the neurons train

    def training_loss(self, batch: Sequence[EditRecord], step: int
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """The contrastive pre-training on triplets (question, new answer, the model's answer)
        of train records; the backbone's states are read with no gradient."""
        triplets = [r for r in batch if r.alt != r.pred]
        if len(triplets) < 2:
            raise ConfigError("editor=unike: a training batch needs two records whose new "
                              "answer differs from the model's; raise editor.training.batch_size")
        edit = [edit_prompts(r, self.templates)[0] for r in triplets]
        wrong = [Prompt(p.text, r.pred, p.image, p.kind) for p, r in zip(edit, triplets)]
        h_q, h_pos = self._states(edit)
        _, h_neg = self._states(wrong)
        nets = self.nets
        parts = {"sem": 0.0, "tru": 0.0, "dir": 0.0}
        total = torch.zeros((), device=h_q[0].device)
        for j in range(len(self._layers)):
            sem = semantic_loss(nets.enc_sem[j](h_q[j]), nets.enc_sem[j](h_pos[j]),
                                nets.enc_sem[j](h_neg[j]), self.temperature)
            tru_pos, tru_neg = nets.enc_tru[j](h_pos[j]), nets.enc_tru[j](h_neg[j])
            tru = truthfulness_loss(tru_pos, tru_neg, self.temperature)
            direction = direction_loss(nets.w_zeta[j], tru_pos.detach(), tru_neg.detach(),
                                       h_pos[j], h_neg[j])
            nets.track_negatives(j, tru_neg.detach())
            total = total + sem + tru + self.direction_weight * direction
            for key, value in (("sem", sem), ("tru", tru), ("dir", direction)):
                parts[key] += value.item() / len(self._layers)
        return total, parts

    def training_key(self, train_records: Sequence[EditRecord]) -> str:
        # the encoders' objective has no regularizer term: UniKE and UniKE+ODEdit share a fit
        regularizer, self.regularizer = self.regularizer, NoRegularizer()
        try:
            return super().training_key(train_records)
        finally:
            self.regularizer = regularizer

    # --- the hooks ---------------------------------------------------------------------------

    @torch.no_grad()
    def _states(self, prompts: Sequence[Prompt]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Self-attention outputs of each knowledge layer at the question's last token (the
        position predicting the first target token) and at the last target token, [B, d]
        each, with the blend off."""
        assert self.backbone is not None
        batch = self.backbone.prepare(prompts, append_eos=self.append_eos)
        rows, cols = batch.target_positions()
        first = torch.full((len(batch),), -1, dtype=torch.long, device=cols.device)
        last = first.clone()
        # target positions are in order of position: the first and the last per row
        first.scatter_reduce_(0, rows, cols, "amin", include_self=False)
        last.scatter_reduce_(0, rows, cols + 1, "amax", include_self=False)
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for i in self._layers:
            def capture(_m: nn.Module, _a: Any, output: Any, i: int = i) -> None:
                captured[i] = (output[0] if isinstance(output, tuple) else output).detach()
            handles.append(self.backbone.modules.attention(i).register_forward_hook(capture))
        with self._blend_off():
            try:
                self.backbone.forward(batch)
            finally:
                for handle in handles:
                    handle.remove()
        index = torch.arange(len(batch), device=cols.device)
        h_q = [captured[i][index, first].float() for i in self._layers]
        h_a = [captured[i][index, last].float() for i in self._layers]
        return h_q, h_a

    @contextmanager
    def _blend_off(self) -> Iterator[None]:
        was, self._blend_on = self._blend_on, False
        try:
            yield
        finally:
            self._blend_on = was

    def _install(self) -> None:
        assert self.backbone is not None
        if self._handles or not self.latent:
            return
        for j, i in enumerate(self._layers):
            def hook(_m: nn.Module, _a: Any, output: Any, j: int = j) -> Any:
                return self._blend(j, output)
            self._handles.append(self.backbone.modules.attention(i).register_forward_hook(hook))

    def _blend(self, j: int, output: Any) -> Any:
        """Self-attention output h → α·h + (1 − α)·h_know at every position."""
        if not self._blend_on or not len(self.sem) or self.sem[j].shape[0] == 0:
            return output
        h = output[0] if isinstance(output, tuple) else output
        flat = h.reshape(-1, h.shape[-1])
        h_know, _ = latent_knowledge(flat, self.sem[j], self.pos[j], self.top_k)
        enc = self.nets.enc_sem[j]
        a = alpha(enc(h_know), enc(flat), self.relevance_threshold)
        new = blend(flat.float(), h_know, a).to(h.dtype).reshape(h.shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    # --- editing -----------------------------------------------------------------------------

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        """Edit the records one after another (each adds its memory entry and its neurons). A
        non-finite loss undoes every edit of this call."""
        assert self.backbone is not None
        if self.networks is None:
            raise RuntimeError("editor=unike: fit() (the encoders' pre-training) before editing")
        blocks = [len(p) for p in self.patches]
        n_memory, remembered = self.memory_size, len(self.remembered)
        outcome = EditOutcome()
        frozen = only_trainable(self.backbone.model, [])  # the new neurons are the trainables
        try:
            for record in records:
                if not self._edit_one(record, outcome):
                    for patch, n in zip(self.patches, blocks):
                        patch.truncate(n)
                    self.sem = [s[:n_memory] for s in self.sem]
                    self.pos = [p[:n_memory] for p in self.pos]
                    del self.remembered[remembered:]
                    outcome.fail_non_finite()
                    break
        finally:
            frozen.restore()
        outcome.extra["n_neurons"] = float(sum(p.n_neurons for p in self.patches))
        outcome.extra["memory"] = float(self.memory_size)
        return outcome

    @property
    def memory_size(self) -> int:
        return self.sem[0].shape[0] if self.sem else 0

    def _edit_one(self, record: EditRecord, outcome: EditOutcome) -> bool:
        backbone = self.backbone
        assert backbone is not None
        request = edit_request(record, self.templates, self.regularizer.reveals)
        # external knowledge first: the neurons train with the edit's own entry retrievable,
        # as they will be used
        h_sem, h_pos = self._states([request.prompt])
        if self.sem:
            self.sem = [torch.cat([s, h]) for s, h in zip(self.sem, h_sem)]
            self.pos = [torch.cat([p, h]) for p, h in zip(self.pos, h_pos)]
        else:
            self.sem, self.pos = h_sem, h_pos
        self._install()
        batch = backbone.prepare([request.prompt], append_eos=self.append_eos)
        queries = ffn_inputs_at(backbone, batch, self._layers)
        rows, cols = batch.target_positions()
        n = min(self.n_neurons, len(cols))
        memory = self._memory(request)
        blocks, params, q_es = [], {}, []
        for j, (i, patch) in enumerate(zip(self._layers, self.patches)):
            q_e = queries[i][rows[:n], cols[:n]].float()                 # [n, d]
            value = self._steering(j, h_sem[j])
            block = patch.add(keys=q_e / q_e.pow(2).sum(dim=1, keepdim=True),
                              biases=q_e.new_zeros(n), values=value.expand(n, -1))
            blocks.append(block)
            q_es.append(q_e)
            params.update(block.named_parameters(f"patch{i}."))
        def patch_loss() -> torch.Tensor:
            loss = torch.zeros((), device=batch.input_ids.device)
            for patch, block, q_e, mem in zip(self.patches, blocks, q_es, memory):
                terms = patch_losses(patch, block, q_e, mem, self.margins)
                loss = loss + self.act_weight * terms["act"] + self.memory_weight * terms["memory"]
            return loss

        try:
            if not train_neurons(backbone, batch, request, self._layers, params, self.regularizer,
                                 patch_loss, self.steps, self.lr, self.weight_decay,
                                 self.early_stop_loss, outcome):
                return False
        finally:
            for patch in self.patches:
                patch.freeze()
        if self.remember_edits:
            attended = batch.attention_mask.bool()
            self.remembered.append((prompt_key(request.prompt),
                                    [queries[i][attended] for i in self._layers]))
        return True

    def _steering(self, j: int, h_sem: torch.Tensor) -> torch.Tensor:
        """β·ζ′ for layer slot ``j``: Tru_pos over the h_pos that the edit's question retrieves
        (its own entry among them), [1, hidden]."""
        if self.truth_beta == 0:
            return torch.zeros_like(h_sem)
        with torch.no_grad():
            _, found = latent_knowledge(h_sem, self.sem[j], self.pos[j], self.top_k)
            nets = self.nets
            tru_pos = nets.enc_tru[j](self.pos[j][found[0]])
            return steering(nets.w_zeta[j], tru_pos, nets.tru_neg[j], self.truth_beta)[None]

    def _memory(self, request: EditRequest) -> list[torch.Tensor | None]:
        """Q_M per knowledge layer: FFN inputs at every attended position of train-split
        out-of-scope prompts, plus (``remember_edits``) those of the stream's earlier edits."""
        assert self.backbone is not None
        parts: list[list[torch.Tensor]] = [[] for _ in self._layers]
        if self.pool is not None:
            prompts = self.pool.out_of_scope(request, self.memory_prompts)
            if prompts:
                batch = self.backbone.prepare(prompts)
                queries = ffn_inputs_at(self.backbone, batch, self._layers)
                attended = batch.attention_mask.bool()
                for j, i in enumerate(self._layers):
                    parts[j].append(queries[i][attended])
        own = prompt_key(request.prompt)
        for key, qs in self.remembered:
            if key != own and key not in request.scored:
                for j, q in enumerate(qs):
                    parts[j].append(q)
        return [torch.cat(p).float() if p else None for p in parts]

    def restore(self) -> None:
        """Remove every neuron, hook and memory entry; the backbone was never changed."""
        for patch in self.patches:
            patch.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.sem, self.pos, self.remembered = [], [], []
        self.regularizer.reset()

    # --- inspection --------------------------------------------------------------------------

    def batch_activations(self, batch: ModelBatch) -> torch.Tensor:
        """Pre-activations h·k + b of every neuron of every layer at every position of
        ``batch``, [batch, seq, n_neurons] (for inspection and the tests)."""
        assert self.backbone is not None
        queries = ffn_inputs_at(self.backbone, batch, self._layers)
        with torch.no_grad():
            return torch.cat([p.pre_activations(queries[i]) for i, p in
                              zip(self._layers, self.patches) if len(p)], dim=-1)
