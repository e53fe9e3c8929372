"""T-Patcher: one trained neuron (or a few) per edit, appended to the FFN of the last layer.

Huang et al., "Transformer-Patcher: One Mistake Worth One Neuron" (ICLR 2023), §3. The
backbone's weights never change: each edit adds neurons (key k_p, bias b_p, value v_p) beside the
FFN of language layer ``layer`` (the paper's last layer; a per-family setting), which adds
act(q·k_p + b_p)·v_p to the FFN's output (``mmke.editors.neurons``). Only the new neurons
train; earlier ones stay frozen, so a sequential stream accumulates them. ``restore`` removes
every neuron and both hooks.

One edit (one neuron per target position, at most ``n_neurons``):
- Queries. q is the FFN's input at the layer (after its layer norm). The edit's queries q_e are
  taken at the positions whose logits predict the target: the last prompt token, then each
  target token but the last. Neuron i keys on the i-th of them. With ``n_neurons=1`` the one
  neuron keys on the last prompt token, the paper's "last token". More give each answer token
  its own neuron, as the authors' code does for generation (one neuron per wrong target token,
  at most ``max_add_neuron_num``). With the patch in the last layer nothing above carries a
  neuron's output to later positions, so a later answer token is produced only where a neuron
  fires at its own position.
- Initialisation (the authors' ``_reset_parameters``): k_p = q_e / ‖q_e‖², b_p = 0, so the
  neuron starts with activation
  exactly 1 on its edit query. v_p = 0, so the model is unchanged until the value trains (the
  authors start v from a random normal times 10, which moves the edit's output before any step).
- Loss (§3, the patch's training objective; the authors' ``calculate_act_loss`` and
  ``calculate_memory_loss``): L = l_e + a·l_a + m·(l_m1 + l_m2), with, for the new neurons,
  l_e the NLL of the new target;
  l_a = mean_i exp(α − (q_e,i·k_i + b_i)) (activation loss: the neuron fires on its edit
  query, above the margin α = ``act_margin``);
  l_m1 = S(Q_M·k + b − β) (memory loss: silent on the memory queries Q_M, below β =
  ``memory_margin``);
  l_m2 = S((Q_M·k + b) − (q_e·k + b) + γ) (the edit's activation exceeds every memory
  activation by γ = ``gap_margin``);
  S(x) the mean of exp over the ``memory_topk`` largest entries (the authors' top-k exp);
  a = ``act_weight``, m = ``memory_weight``. Adam (``lr``, ``weight_decay``) for ``steps``
  steps. Defaults are the authors' (lr 1e-2, weight decay 0.01, a = 1, m = 5, α = 0,
  β = −3, γ = 3).
- Memory queries Q_M ("the patch stays silent on other inputs"). They are FFN inputs at every
  attended position (image tokens included) of ``memory_prompts`` out-of-scope prompts drawn
  from the train split per edit (``TrainPool.out_of_scope``: never a prompt scored for the
  record, never a record of the edit's question kind). Under ``remember_edits`` the positions of
  earlier edits of the stream join them, as the authors' ``update_memory`` does, so a new
  neuron stays silent on the edits before it; an earlier edit whose prompt is scored for the
  current record, or is the current edit prompt itself, is left out.

Positions at inference. The patch acts at every position where it activates, as an appended
neuron does. The alternative, acting only from the end of the prompt on, would need the
prompt's end at every forward (GRACE's route). It would also break the regularizers' own
forwards: ODEdit's KL on out-of-scope prompts and ASAM's variants call the backbone directly,
and the patch must act there too for their terms to train it. In the last layer, acting at a
prompt position changes only that position's logits, which teacher-forced scoring and greedy
decoding do not read. The memory loss keeps the neurons silent on every position of unrelated
inputs. tests/editors/test_tpatcher.py measures how silent.

Regularizers (``reg=odedit``, ``reg=asam``) enter through the seam as in FT: ``begin`` with
the edit layer and the new neurons as trainable parameters, ``loss`` added at every step,
``after_step``, ``end``. The edit request holds the edit prompt and only fingerprints of the
scored prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmke.backbones.base import Backbone, ModelBatch
from mmke.data.prompts import PromptTemplates
from mmke.data.record import EditRecord
from mmke.editors.base import EditOutcome, Editor
from mmke.editors.neurons import (ACTIVATIONS, NeuronBlock, NeuronPatch, PatchMargins,
                                  ffn_inputs, patch_losses, top_k_exp_mean, train_neurons)
from mmke.editors.snapshot import only_trainable
from mmke.errors import ConfigError, check_choice
from mmke.regularizers.base import (EditRequest, Regularizer, TrainRecords, edit_request,
                                    prompt_key)
from mmke.regularizers.pool import TrainPool


__all__ = ["TPatcher", "top_k_exp_mean"]


class TPatcher(Editor):
    """T-Patcher on the FFN of language layer ``layer`` (negative: from the end).

    ``n_neurons``: at most this many neurons per edit, one per target position;
    ``activation``: relu | gelu; ``lr``, ``steps``, ``weight_decay``: Adam on the new neurons;
    ``early_stop_loss``: stop once the edit's NLL is below it (None: always ``steps``);
    ``act_weight``, ``memory_weight``: a and m of the loss;
    ``act_margin``, ``memory_margin``, ``gap_margin``: α, β, γ; ``memory_prompts``: train-split
    out-of-scope prompts per edit; ``memory_topk``: the k of S; ``remember_edits``: earlier edits
    of the stream join the memory; ``append_eos``: also train the end token after the target;
    ``seed``: the train-split draws.
    """

    def __init__(self, layer: int = -1, n_neurons: int = 1, activation: str = "relu",
                 lr: float = 1e-2, steps: int = 25, weight_decay: float = 0.01,
                 early_stop_loss: float | None = None, act_weight: float = 1.0,
                 memory_weight: float = 5.0, act_margin: float = 0.0,
                 memory_margin: float = -3.0, gap_margin: float = 3.0,
                 memory_prompts: int = 20, memory_topk: int = 1000,
                 remember_edits: bool = True, append_eos: bool = False, seed: int = 0,
                 regularizer: Regularizer | None = None, name: str = "tpatcher") -> None:
        super().__init__(regularizer, name)
        check_choice("editor.activation", activation, tuple(ACTIVATIONS))
        for setting, value in (("n_neurons", n_neurons), ("steps", steps),
                               ("memory_topk", memory_topk)):
            if value < 1:
                raise ConfigError(f"editor.{setting}={value!r} must be >= 1")
        if not lr > 0:
            raise ConfigError(f"editor.lr={lr!r} must be > 0")
        for setting, value in (("weight_decay", weight_decay), ("act_weight", act_weight),
                               ("memory_weight", memory_weight),
                               ("memory_prompts", memory_prompts)):
            if value < 0:
                raise ConfigError(f"editor.{setting}={value!r} must be >= 0")
        self.layer, self.n_neurons, self.activation = layer, n_neurons, activation
        self.lr, self.steps, self.weight_decay = lr, steps, weight_decay
        self.early_stop_loss = early_stop_loss
        self.act_weight, self.memory_weight = act_weight, memory_weight
        self.act_margin, self.memory_margin, self.gap_margin = act_margin, memory_margin, gap_margin
        self.memory_prompts, self.memory_topk = memory_prompts, memory_topk
        self.remember_edits, self.append_eos, self.seed = remember_edits, append_eos, seed
        self.patch: NeuronPatch | None = None
        self.pool: TrainPool | None = None
        #: (prompt fingerprint, FFN inputs at every position) of each edit of the stream so far
        self.remembered: list[tuple[str, torch.Tensor]] = []

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        super().attach(backbone, templates, train_records)
        mods = backbone.modules
        self._layer = self._resolve_layer(self.layer)
        if self.patch is not None:
            self.patch.remove()
        self.patch = NeuronPatch(mods.ffn_in(self._layer), mods.ffn_out(self._layer),
                                 self.activation)
        if self.memory_prompts > 0:
            if train_records is None:
                raise ConfigError(
                    "editor=tpatcher draws its memory set from the train split "
                    f"(editor.memory_prompts={self.memory_prompts}); attach it with "
                    "train_records, or set editor.memory_prompts=0")
            self.pool = TrainPool(train_records, templates, seed=self.seed)

    # --- editing ----------------------------------------------------------------------------

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        """Edit the records one after another, each adding its own neurons (the paper's
        sequential editing). A non-finite loss undoes every neuron of this call."""
        assert self.backbone is not None and self.patch is not None
        blocks, remembered = len(self.patch), len(self.remembered)
        outcome = EditOutcome()
        frozen = only_trainable(self.backbone.model, [])  # the new neurons are the trainables
        try:
            for record in records:
                if not self._edit_one(record, outcome):
                    self.patch.truncate(blocks)
                    del self.remembered[remembered:]
                    outcome.fail_non_finite()
                    break
        finally:
            frozen.restore()
        outcome.extra["n_neurons"] = float(self.patch.n_neurons)
        return outcome

    def _edit_one(self, record: EditRecord, outcome: EditOutcome) -> bool:
        backbone, patch = self.backbone, self.patch
        assert backbone is not None and patch is not None
        request = edit_request(record, self.templates, self.regularizer.reveals)
        batch = backbone.prepare([request.prompt], append_eos=self.append_eos)
        queries = ffn_inputs(backbone, batch, self._layer)           # [1, S, d]
        rows, cols = batch.target_positions()                        # in order of position
        n = min(self.n_neurons, len(cols))
        q_e = queries[rows[:n], cols[:n]].float()                    # [n, d]
        memory = self._memory(request)
        block = patch.add(keys=q_e / q_e.pow(2).sum(dim=1, keepdim=True),
                          biases=q_e.new_zeros(len(q_e)),
                          values=q_e.new_zeros(len(q_e), self._out_dim()))
        def patch_loss() -> torch.Tensor:
            terms = self._patch_losses(block, q_e, memory)
            return self.act_weight * terms["act"] + self.memory_weight * terms["memory"]

        try:
            # the new neurons start with zero values: the model is still the unedited one
            if not train_neurons(backbone, batch, request, [self._layer],
                                 block.named_parameters("patch."), self.regularizer, patch_loss,
                                 self.steps, self.lr, self.weight_decay, self.early_stop_loss,
                                 outcome):
                return False
        finally:
            patch.freeze()
        self._report(block, q_e, memory, outcome)
        if self.remember_edits:
            self.remembered.append((prompt_key(request.prompt),
                                    queries[batch.attention_mask.bool()]))
        return True

    def _patch_losses(self, block: NeuronBlock, q_e: torch.Tensor,
                      memory: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """l_a and l_m1 + l_m2 (the activation and memory losses) for the new neurons."""
        assert self.patch is not None
        return patch_losses(self.patch, block, q_e, memory,
                            PatchMargins(self.act_margin, self.memory_margin, self.gap_margin,
                                         self.memory_topk))

    def _memory(self, request: EditRequest) -> torch.Tensor | None:
        """Q_M for this edit: FFN inputs at every attended position of train-split out-of-scope
        prompts, plus (``remember_edits``) those of the stream's earlier edits."""
        assert self.backbone is not None
        parts = []
        if self.pool is not None:
            prompts = self.pool.out_of_scope(request, self.memory_prompts)
            if prompts:
                batch = self.backbone.prepare(prompts)
                parts.append(ffn_inputs(self.backbone, batch, self._layer)
                             [batch.attention_mask.bool()])
        own = prompt_key(request.prompt)
        parts += [q for key, q in self.remembered if key != own and key not in request.scored]
        return torch.cat(parts).float() if parts else None

    def _out_dim(self) -> int:
        assert self.backbone is not None
        return self.backbone.modules.ffn_out(self._layer).weight.shape[0]

    @torch.no_grad()
    def _report(self, block: NeuronBlock, q_e: torch.Tensor, memory: torch.Tensor | None,
                outcome: EditOutcome) -> None:
        """The trained neurons' smallest activation on their edit queries and the share of
        memory queries on which any of them fires (pre-activation > 0)."""
        assert self.patch is not None
        a_e = self.patch.pre_activations(q_e, [block]).diagonal()
        outcome.extra["edit_activation_min"] = float(a_e.min())
        if memory is not None:
            fires = (self.patch.pre_activations(memory, [block]) > 0).any(dim=1)
            outcome.extra["memory_fire_rate"] = float(fires.float().mean())

    def restore(self) -> None:
        """Remove every neuron and both hooks; the backbone was never changed."""
        if self.patch is not None:
            self.patch.remove()
        self.remembered = []
        self.regularizer.reset()

    def batch_activations(self, batch: ModelBatch) -> torch.Tensor:
        """Pre-activations h·k + b of every neuron at every position of ``batch``,
        [batch, seq, n_neurons] (for inspection and the tests)."""
        assert self.backbone is not None and self.patch is not None
        with torch.no_grad():
            return self.patch.pre_activations(ffn_inputs(self.backbone, batch, self._layer))
