"""GRACE: a discrete key-value codebook wrapping one module of one language layer.

Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors"
(NeurIPS 2023). The backbone's weights never change. A forward hook on the wrapped module (a
per-family setting, named by backbone role: ``ffn_out`` is OPT ``fc2`` / Llama ``down_proj``)
reads the module's input at the last prompt token as the query h (§3.1: for autoregressive models
the last token of the input is the key). If h lies within the deferral radius of its nearest key,
the key's value replaces the module's output (§3.1, the GRACE layer). Otherwise the module runs as
before. Each edit first updates the codebook by the paper's rules (§3.2, Algorithm 1: add, expand,
split). It then trains one value with Adam on the edit's target NLL; that value is the only
trainable tensor. The codebook grows over a stream. ``restore`` removes the hook and the codebook.

Which positions a hit writes (``replace``), and why. The deferral decision is made at the last
prompt token, the only position whose state the key describes.
- ``key`` writes the value there alone. This is the authors' ``replace_last``, EasyEdit's choice for
  decoder LLMs. Later positions read the value through attention in the layers above, which is
  enough when many layers lie above.
- ``key_onward`` also writes it on every later position of the row: the answer's tokens, whether
  teacher-forced or generated. This is the authors' ``replace_all`` limited to the positions the
  decision is about. On a 4-layer tiny model only one layer lies above, and two-token answers
  need it (conf/editor_backbone/grace_tiny_blip2.yaml).
Positions before the key are never written. They hold the prompt, image tokens included, and the
key says nothing about them. Either way teacher-forced scoring and KV-cached greedy decoding see
the same intervention: the decision taken on the prompt's forward holds for the decoding steps.

The codebook is read only through ``Grace.forward`` and ``Grace.generate``. They know where each
prompt ends (the evaluator's batches hold prompt and target; generation's hold the prompt alone).
A direct backbone forward while edits are in place raises rather than guess.

Regularizers: GRACE trains one value vector per edit, not the model's weights. The issue asks
nothing of it with ODEdit or ASAM, so it refuses any (``reg=none``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from mmke.backbones.base import IGNORE_INDEX, Backbone, ForwardOutput, ModelBatch
from mmke.data.prompts import PromptTemplates, edit_prompts
from mmke.data.record import EditRecord, Prompt
from mmke.editors.base import EditOutcome, Editor
from mmke.editors.snapshot import only_trainable
from mmke.errors import ConfigError, check_choice
from mmke.regularizers.base import Regularizer, TrainRecords

#: roles whose module maps one tensor to one tensor, so a value can stand in for its output
ROLES = ("ffn_out", "ffn_in")
#: how a new entry's value starts: ``cold`` uniform in [0, 1) as the authors' code; ``warm`` the
#: module's own output at the key (EasyEdit's ``val_init``)
VALUE_INITS = ("cold", "warm")
#: where a hit writes its value: ``key`` the keyed token only (the authors' ``replace_last``),
#: ``key_onward`` the keyed token and every token after it (see ``Grace``)
REPLACE = ("key", "key_onward")
#: split (Algorithm 1): the old radius ends this far inside d/2 so the two balls never touch
#: (the authors' code, ``split_epsilons_in_half``)
SPLIT_GAP = 1e-5


def pairwise_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [n_queries, n_keys] in float32, each pair computed on its own.
    cdist's matrix-product shortcut would round one pair differently depending on the batch
    around it. A key placed on a radius by ``expand`` must stay on it when read in any batch."""
    return torch.cdist(queries.float(), keys.float(),
                       compute_mode="donot_use_mm_for_euclid_dist")


class Codebook:
    """GRACE's adaptor state (§3.1): keys (queries of past edits), values (module outputs that
    replace the module's own), deferral radii and the label (target) each entry was written for.
    """

    def __init__(self, eps_init: float) -> None:
        self.eps_init = eps_init
        self.keys: torch.Tensor | None = None        # [n, key_dim], float32
        self.radii: torch.Tensor | None = None       # [n], float32
        self.values: list[nn.Parameter] = []         # n tensors [value_dim], float32
        self.labels: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, each query's nearest key. The paper defers to that key
        alone (i* = argmin_i d(h, k_i))."""
        if self.keys is None:
            raise ValueError("the codebook is empty")
        return pairwise_distances(queries, self.keys).min(dim=1)

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query: its nearest entry, and whether the query lies within that entry's
        deferral radius, d(h, k_i*) <= eps_i* (§3.1)."""
        dist, index = self.nearest(queries)
        assert self.radii is not None
        return index, dist <= self.radii[index]

    def admit(self, query: torch.Tensor, label: str, value: torch.Tensor) -> tuple[int, str]:
        """Update the codebook for an edit with key ``query`` and target ``label`` (Algorithm 1).
        Returns the entry whose value the edit trains and what was done:

        - ``add``: empty codebook, or d* > eps_init + eps_i* (the new ball would not overlap
          the nearest one): a new entry with radius eps_init and value ``value``;
        - ``expand``: same label, within that reach: eps_i* grows to d* if the key lies outside it
          (``within`` when it already lay inside), and the edit trains that entry's value;
        - ``split``: a different label within that reach: a new entry, and both radii become
          d*/2 so the conflicting edits are told apart.
        """
        key = query.detach().float().reshape(1, -1)
        if self.keys is None:
            return self._add(key, label, value), "add"
        dist, index = self.nearest(key)
        d, i = dist[0], int(index[0])
        assert self.radii is not None
        if d > self.eps_init + self.radii[i]:
            return self._add(key, label, value), "add"
        if label == self.labels[i]:
            if d <= self.radii[i]:
                return i, "within"
            self.radii[i] = d
            return i, "expand"
        new = self._add(key, label, value)
        self.radii[i] = d / 2 - SPLIT_GAP
        self.radii[new] = d / 2
        return new, "split"

    def _add(self, key: torch.Tensor, label: str, value: torch.Tensor) -> int:
        radius = key.new_tensor([self.eps_init])
        self.keys = key if self.keys is None else torch.cat([self.keys, key])
        self.radii = radius if self.radii is None else torch.cat([self.radii, radius])
        self.values.append(nn.Parameter(value.detach().float().reshape(-1).clone()))
        self.labels.append(label)
        return len(self.labels) - 1

    def checkpoint(self) -> _Checkpoint:
        """What ``rollback`` needs to undo the edits that follow."""
        return _Checkpoint(len(self), None if self.radii is None else self.radii.clone())

    @torch.no_grad()
    def rollback(self, point: _Checkpoint) -> None:
        """Drop entries added since ``point``; put back the radii and trained values it saved."""
        n = point.size
        self.keys = None if n == 0 or self.keys is None else self.keys[:n]
        self.radii = point.radii
        del self.values[n:], self.labels[n:]
        for i, value in point.values.items():
            self.values[i].copy_(value)

    def values_at(self, index: torch.Tensor) -> torch.Tensor:
        """The values of entries ``index``, stacked [len(index), value_dim] (differentiable)."""
        return torch.stack([self.values[i] for i in index.tolist()])


@dataclass
class _Checkpoint:
    size: int
    radii: torch.Tensor | None
    #: values of existing entries as they were before an edit of this call trained them
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def keep(self, index: int, value: torch.Tensor) -> None:
        if index < self.size and index not in self.values:
            self.values[index] = value.detach().clone()


@dataclass
class _Plan:
    """What the hook does in the next forward: which row position holds each prompt's last
    token, and whether it reads the codebook, trains one entry, or only records the queries."""

    rows: int
    #: per row, the position of the last prompt token; None: the last position (generation)
    positions: torch.Tensor | None = None
    #: generation: the first call holds the prompt and is keyed; later calls are decoding steps
    generation: bool = False
    #: training: this entry's value replaces the output, whatever the distance
    entry: int | None = None
    capture: bool = False
    calls: int = 0
    #: capture: the queries and the module's outputs at the key positions
    queries: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    #: read or train: each row's entry and whether its key hit (kept for decoding steps)
    index: torch.Tensor | None = None
    hit: torch.Tensor | None = None


def last_prompt_positions(batch: ModelBatch) -> torch.Tensor:
    """Per row, the position of the last prompt token: the one whose logits predict the first
    target token (left padding puts it at the end of a row without a target)."""
    predicts_target = batch.labels[:, 1:] != IGNORE_INDEX
    first = predicts_target.int().argmax(dim=1)
    last = torch.full_like(first, batch.input_ids.shape[1] - 1)
    return torch.where(predicts_target.any(dim=1), first, last)


class Grace(Editor):
    """GRACE on one module of one language layer (``role`` at ``layer``).

    ``eps_init``: the deferral radius of a new entry; ``lr``, ``steps``: Adam on the value
    (paper: lr 1.0); ``early_stop_loss``: stop training a value once the edit's NLL falls below
    it (None: always ``steps``); ``value_init``: ``cold`` or ``warm``; ``replace``: ``key`` or
    ``key_onward`` (module docstring); ``append_eos``: also train the end token after the
    target, as FT's setting; ``seed``: the cold values' generator (restarted by ``restore``, so
    a stream's values do not depend on the streams before it).
    """

    accepts_regularizer = False

    def __init__(self, layer: int = 27, role: str = "ffn_out", eps_init: float = 1.0,
                 lr: float = 1.0, steps: int = 50, early_stop_loss: float | None = None,
                 value_init: str = "cold", replace: str = "key", append_eos: bool = False,
                 seed: int = 0, regularizer: Regularizer | None = None,
                 name: str = "grace") -> None:
        if regularizer is not None and regularizer.active:
            raise ConfigError(
                f"editor=grace takes no regularizer (reg={regularizer.name}): it trains one "
                "codebook value per edit, not the model, and has no ODEdit/ASAM terms; "
                "use reg=none")
        super().__init__(regularizer, name)
        check_choice("editor.role", role, ROLES)
        check_choice("editor.value_init", value_init, VALUE_INITS)
        check_choice("editor.replace", replace, REPLACE)
        if not eps_init > 0:
            raise ConfigError(f"editor.eps_init={eps_init!r} must be > 0")
        if steps < 1 or not lr > 0:
            raise ConfigError(f"editor.steps={steps!r} must be >= 1 and editor.lr={lr!r} > 0")
        self.layer, self.role, self.eps_init = layer, role, eps_init
        self.lr, self.steps, self.early_stop_loss = lr, steps, early_stop_loss
        self.value_init, self.replace = value_init, replace
        self.append_eos, self.seed = append_eos, seed
        self.codebook = Codebook(eps_init)
        self._generator = torch.Generator().manual_seed(seed)
        self._module: nn.Module | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._plan: _Plan | None = None

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        super().attach(backbone, templates, train_records)
        try:
            self._module = backbone.modules.by_role(self.role, self.layer)
        except (IndexError, ValueError) as err:
            raise ConfigError(f"editor.layer={self.layer}, editor.role={self.role}: {err}") from err

    # --- the edited model -------------------------------------------------------------------

    def forward(self, batch: ModelBatch, output_hidden_states: bool = False) -> ForwardOutput:
        """The backbone's forward through the codebook, each row keyed on its last prompt token
        (the token before its first target token)."""
        if self._handle is None:
            return super().forward(batch, output_hidden_states)
        with self._armed(_Plan(len(batch), last_prompt_positions(batch))):
            return super().forward(batch, output_hidden_states)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy answers through the codebook. The prompt's forward is keyed on its last token,
        as in teacher-forced scoring. Each decoding step then adds one token after the prompt;
        it gets the row's value under ``key_onward`` when the prompt hit, and nothing otherwise."""
        if self._handle is None:
            return super().generate(prompts, max_new_tokens)
        with self._armed(_Plan(len(prompts), generation=True)):
            return super().generate(prompts, max_new_tokens)

    @torch.no_grad()
    def queries(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """The codebook's queries for ``prompts``: the wrapped module's input at each prompt's
        last prompt token, [len(prompts), key_dim] (what an edit of each would key on)."""
        assert self.backbone is not None
        batch = self.backbone.prepare(prompts, append_eos=self.append_eos)
        plan = self._capture(batch)
        assert plan.queries is not None
        return plan.queries

    @contextmanager
    def _armed(self, plan: _Plan) -> Iterator[_Plan]:
        self._plan = plan
        try:
            yield plan
        finally:
            self._plan = None

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Key each row on its last prompt token (§3.1); where the key falls within a radius,
        write the value over the module's output at the positions ``replace`` names."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("GRACE's codebook is read through Grace.forward and Grace.generate, "
                               "which tell it where each prompt ends; call the editor, not the "
                               "backbone, while its edits are in place")
        # OPT flattens [batch, seq] before its FFN: bring every family to [rows, seq, dim]
        x = args[0].reshape(plan.rows, -1, args[0].shape[-1])
        y = output.reshape(plan.rows, -1, output.shape[-1])
        plan.calls += 1
        if plan.calls > 1:
            return self._decoding_step(plan, y, output.shape)
        rows = torch.arange(plan.rows, device=x.device)
        positions = (plan.positions.to(x.device) if plan.positions is not None
                     else torch.full_like(rows, x.shape[1] - 1))
        queries = x[rows, positions]
        if plan.capture:
            plan.queries, plan.outputs = queries.detach().float(), y[rows, positions].detach()
            return None
        if plan.entry is None and len(self.codebook) == 0:
            return None  # an edit call without records left the hook and no entry
        if plan.entry is not None:
            plan.index = torch.full_like(rows, plan.entry)
            plan.hit = torch.ones_like(rows, dtype=torch.bool)
        else:
            index, hit = self.codebook.lookup(queries)
            plan.index, plan.hit = index.to(x.device), hit.to(x.device)
        if not plan.hit.any():
            return None
        at = torch.arange(y.shape[1], device=y.device)[None, :]
        where = at == positions[:, None] if self.replace == "key" else at >= positions[:, None]
        return self._write(y, where & plan.hit[:, None], plan.index, output.shape)

    def _decoding_step(self, plan: _Plan, y: torch.Tensor,
                       shape: torch.Size) -> torch.Tensor | None:
        """A greedy decoding step: one new token per row (KV cache), after the prompt. Under
        ``key_onward`` the rows whose prompt hit get the value again; under ``key`` nothing."""
        if not plan.generation:
            raise RuntimeError("GRACE expects one call of its module per forward")
        if self.replace == "key" or plan.hit is None or not plan.hit.any():
            return None
        if y.shape[1] != 1:
            raise RuntimeError("GRACE decodes with the KV cache: one new token per row and step")
        assert plan.index is not None
        return self._write(y, plan.hit[:, None], plan.index, shape)

    def _write(self, y: torch.Tensor, where: torch.Tensor, index: torch.Tensor,
               shape: torch.Size) -> torch.Tensor:
        """``y`` [rows, seq, dim] with row r's positions ``where[r]`` set to entry index[r]'s
        value (differentiable in the values), in the module's own output shape."""
        values = self.codebook.values_at(index).to(device=y.device, dtype=y.dtype)
        return torch.where(where[..., None], values[:, None, :], y).reshape(shape)

    def _capture(self, batch: ModelBatch) -> _Plan:
        """One forward that records the queries and the module's outputs at the key positions
        (the codebook neither read nor changed)."""
        assert self.backbone is not None and self._module is not None
        handle = self._handle or self._module.register_forward_hook(self._hook)
        plan = _Plan(len(batch), last_prompt_positions(batch), capture=True)
        try:
            with self._armed(plan), torch.no_grad():
                self.backbone.forward(batch)
        finally:
            if handle is not self._handle:
                handle.remove()
        return plan

    # --- editing ----------------------------------------------------------------------------

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        """Edit the records one after another, as the paper's stream does. A non-finite loss
        undoes every change of this call."""
        assert self.backbone is not None and self._module is not None
        if self._handle is None:
            self._handle = self._module.register_forward_hook(self._hook)
        point = self.codebook.checkpoint()
        outcome = EditOutcome()
        frozen = only_trainable(self.backbone.model, [])  # the values are the only trainables
        try:
            for record in records:
                if not self._edit_one(record, point, outcome):
                    self.codebook.rollback(point)
                    if len(self.codebook) == 0:
                        self._remove_hook()
                    outcome.fail_non_finite()
                    break
        finally:
            frozen.restore()
        outcome.extra["codebook_size"] = float(len(self.codebook))
        return outcome

    def _edit_one(self, record: EditRecord, point: _Checkpoint, outcome: EditOutcome) -> bool:
        """Algorithm 1 for one edit, then train the chosen value on the edit's own prompt.
        Counts steps and actions into ``outcome``; False on a non-finite loss."""
        backbone = self.backbone
        assert backbone is not None
        prompt = edit_prompts(record, self.templates)[0]
        batch = backbone.prepare([prompt], append_eos=self.append_eos)
        seen = self._capture(batch)
        assert seen.queries is not None and seen.outputs is not None
        index, action = self.codebook.admit(seen.queries[0], prompt.target,
                                            self._initial_value(seen.outputs[0]))
        outcome.extra[f"n_{action}"] = outcome.extra.get(f"n_{action}", 0.0) + 1.0
        value = self.codebook.values[index]
        point.keep(index, value)
        optimizer = torch.optim.Adam([value], lr=self.lr)
        positions = last_prompt_positions(batch)
        try:
            for _ in range(self.steps):
                with self._armed(_Plan(1, positions, entry=index)):
                    loss = backbone.nll(batch, backbone.forward(batch))
                outcome.final_loss = loss.item()
                if not math.isfinite(outcome.final_loss):
                    return False
                if self.early_stop_loss is not None and outcome.final_loss < self.early_stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                outcome.steps += 1
        finally:
            value.grad = None
        return True

    def _initial_value(self, output: torch.Tensor) -> torch.Tensor:
        if self.value_init == "warm":
            return output
        # drawn on the CPU from the editor's own generator: the same values on every device
        return torch.rand(output.shape[-1], generator=self._generator).to(output.device)

    def restore(self) -> None:
        """Remove the hook and the codebook; the backbone was never changed."""
        self._remove_hook()
        self.codebook = Codebook(self.eps_init)
        self._generator.manual_seed(self.seed)

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
