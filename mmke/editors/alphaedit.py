"""AlphaEdit: locate-then-edit updates of the FFN output matrices, projected onto the null space
of the keys of retained knowledge.

Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models" (ICLR
2025), on MEMIT's machinery (Meng et al., ICLR 2023). Per edit call (one or more records):

1. Target vectors (MEMIT §4.2 / Eq. 9-10; the authors' ``compute_z``). For each edit, a residual
   δ is added to the output of the last edited language layer (the residual stream there) at the
   edit prompt's last token, and Adam (``v_lr``, ``v_steps``) minimises
   NLL(target) + ``v_weight_decay``·‖δ‖/‖z₀‖² (``target_weight_decay``), with ‖δ‖ clamped to
   ``clamp_norm_factor``·‖z₀‖ after every step. z = z₀ + δ. MEMIT's KL term on
   "{subject} is a" prompts is left out: a multimodal prompt has no subject span, and the key
   token's next-token distribution is exactly the one the edit must change, so there is no
   essence prompt to keep.
   One position carries δ, as in the authors' code: the target tokens after the first are
   reached only through attention above the edited layers. Where a tokenizer splits an answer
   (the tiny LLaVA's " no" is " " + "no"), a wrong token at another position barely moves
   (conf/editor_backbone/alphaedit_tiny_llava.yaml).
2. Keys k (MEMIT Eq. 14): the input of ``ffn_out`` (the FFN's hidden activation) at the same
   token, per edited layer.
3. Spread (MEMIT Alg. 1): the layers are updated from the lowest up; before layer l's update
   the residual R = (z − z_cur) / (layers left) is measured again, so each layer takes its share
   of what the ones below did not write.
4. Update (AlphaEdit Eq. 14 in the authors' code's form, ``AlphaEdit_main.py``):
   ΔWᵀ = (P (K1K1ᵀ + C_prev) + L2·I)⁻¹ P K1 Rᵀ, with P the null-space projector of K0K0ᵀ
   (``mmke.editors.nullspace``; eigenvalues below ``nullspace_threshold``) and C_prev = Σ K_pK_pᵀ
   over the earlier edits of the stream (Eq. 15's K_p). Since ΔW = ΔW P, the outputs W K0 of the
   retained keys stay as they were.
5. C_prev += K1K1ᵀ with the keys measured after the update (the authors' order).

K0: ``ffn_out`` inputs at every attended position (image and text tokens, answer teacher-forced)
of the edit question with its true answer, over ``k0_records`` train records of each source in
``k0_data`` (M-ORE: E-VQA and E-IC train samples), or of the task's own train split when
``k0_data`` is empty. Eval records never enter it. Built once in ``attach`` (progress bar),
cached under ``cache_dir``.

Regularizers: the update is closed-form, and the only optimisation is of one hidden vector per
edit, not of the model's parameters. ODEdit's λ network reads the edited parameters and ASAM
aligns the hidden states a weight update changes; neither is defined on δ, and no paper pairs
them with AlphaEdit. So ``reg=none`` only (``accepts_regularizer = False``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mmke.backbones.base import Backbone, ModelBatch
from mmke.data.prompts import PromptTemplates, original_prompt
from mmke.data.record import EditRecord, Prompt
from mmke.editors.base import EditOutcome, Editor
from mmke.editors.nullspace import cached_second_moments, null_space_projector
from mmke.editors.snapshot import WeightSnapshot, only_trainable
from mmke.errors import ConfigError
from mmke.regularizers.base import Regularizer, TrainRecords, edit_request
from mmke.regularizers.hidden import last_prompt_positions


class RecordSource(Protocol):
    """A data source whose train split contributes to K0 (``MMEditSource`` is one)."""

    templates: PromptTemplates

    def records(self, split: str, limit: int | None = None) -> Sequence[EditRecord]: ...


def _hidden(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class AlphaEdit(Editor):
    """AlphaEdit on ``ffn_out`` of language layers ``layers`` (negative: from the end).

    ``nullspace_threshold``: eigenvalues of K0K0ᵀ/n below it span the null space (paper 1e-2);
    ``L2``: the ridge term of the solve (authors: 10); ``v_lr``, ``v_steps``: Adam on δ;
    ``v_weight_decay``: weight of ‖δ‖/‖z₀‖²; ``clamp_norm_factor``: ‖δ‖ ≤ factor·‖z₀‖;
    ``v_early_stop``: stop optimising δ once the NLL is below it (the authors' compute_z stops on
    the total loss, decay included, and makes ``v_steps`` − 1 updates; mmke stops on the NLL and
    makes ``v_steps``, which the tiny settings were chosen with); ``k0_records``: train records
    per source for K0; ``k0_data``: the sources (empty: the task's train split);
    ``k0_batch_size``: prompts per forward when building K0; ``cache_dir``: where K0 is kept;
    ``seed``: which train records K0 takes; ``progress``: a progress bar while building K0.
    """

    accepts_regularizer = False

    def __init__(self, layers: Sequence[int] = (-7, -6, -5, -4, -3, -2, -1),
                 nullspace_threshold: float = 1e-2, L2: float = 10.0,  # noqa: N803 (paper's name)
                 v_lr: float = 0.5, v_steps: int = 25, v_weight_decay: float = 0.5,
                 clamp_norm_factor: float = 0.75, v_early_stop: float | None = 5e-2,
                 k0_records: int = 1000, k0_data: Sequence[RecordSource] = (),
                 k0_batch_size: int = 16, cache_dir: str | None = None, seed: int = 0,
                 progress: bool = True, regularizer: Regularizer | None = None,
                 name: str = "alphaedit") -> None:
        if regularizer is not None and regularizer.active:
            raise ConfigError(
                f"editor=alphaedit takes no regularizer (reg={regularizer.name}): its update is "
                "closed-form and it optimises one hidden vector per edit, not the model; "
                "use reg=none")
        super().__init__(regularizer, name)
        if not layers:
            raise ConfigError("editor.layers must name at least one language layer")
        for setting, value in (("v_steps", v_steps), ("k0_records", k0_records),
                               ("k0_batch_size", k0_batch_size)):
            if value < 1:
                raise ConfigError(f"editor.{setting}={value!r} must be >= 1")
        for setting, value in (("v_lr", v_lr), ("clamp_norm_factor", clamp_norm_factor),
                               ("nullspace_threshold", nullspace_threshold)):
            if not value > 0:
                raise ConfigError(f"editor.{setting}={value!r} must be > 0")
        if L2 < 0 or v_weight_decay < 0:
            raise ConfigError("editor.L2 and editor.v_weight_decay must be >= 0")
        self.layers = list(layers)
        self.nullspace_threshold, self.L2 = nullspace_threshold, L2
        self.v_lr, self.v_steps, self.v_weight_decay = v_lr, v_steps, v_weight_decay
        self.clamp_norm_factor, self.v_early_stop = clamp_norm_factor, v_early_stop
        self.k0_records, self.k0_data, self.k0_batch_size = k0_records, list(k0_data), k0_batch_size
        self.cache_dir, self.seed, self.progress = cache_dir, seed, progress
        self.snapshot = WeightSnapshot()
        self._layers: list[int] = []                   # absolute, ascending
        self.projectors: dict[int, torch.Tensor] = {}  # P per layer, [ffn_dim, ffn_dim]
        self.c_prev: dict[int, torch.Tensor] = {}      # Σ K_p K_pᵀ of the stream so far
        self.k0_path: Path | None = None
        self.k0_built = False

    # --- K0 and the projectors ---------------------------------------------------------------

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        super().attach(backbone, templates, train_records)
        mods = backbone.modules
        try:
            self._layers = sorted({mods.resolve_layer(i) for i in self.layers})
        except IndexError as err:
            raise ConfigError(f"editor.layers={self.layers}: {err}") from err
        if self.cache_dir is None:
            raise ConfigError("editor=alphaedit keeps K0 on disk: set editor.cache_dir")
        prompts = self.k0_prompts(templates, train_records)
        covs, self.k0_path, self.k0_built = cached_second_moments(
            backbone, prompts, self._layers, self.cache_dir, self.k0_batch_size, self.progress)
        self.projectors = {layer: null_space_projector(cov, self.nullspace_threshold)
                           .to(backbone.device) for layer, cov in covs.items()}
        self._reset_stream()

    def k0_prompts(self, templates: PromptTemplates,
                   train_records: TrainRecords | None) -> list[Prompt]:
        """The prompts whose keys make K0: per source, ``k0_records`` train records drawn with
        ``seed``, each as its edit question with its true answer on its own picture."""
        if self.k0_data:
            sources = [(list(s.records("train")), s.templates) for s in self.k0_data]
        elif train_records is not None:
            sources = [(list(train_records()), templates)]
        else:
            raise ConfigError("editor=alphaedit builds K0 from the train split: attach it with "
                              "train_records, or set editor.k0_data")
        prompts: list[Prompt] = []
        for records, source_templates in sources:
            order = torch.randperm(len(records),
                                   generator=torch.Generator().manual_seed(self.seed)).tolist()
            prompts += [original_prompt(records[i], source_templates)
                        for i in order[:self.k0_records]]
        return prompts

    def _reset_stream(self) -> None:
        assert self.backbone is not None
        self.c_prev = {layer: torch.zeros_like(p) for layer, p in self.projectors.items()}

    # --- editing ----------------------------------------------------------------------------

    def _weights(self) -> dict[str, nn.Parameter]:
        assert self.backbone is not None
        return {f"ffn_out[{layer}].weight": self.backbone.modules.ffn_out(layer).weight
                for layer in self._layers}

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        """One MEMIT/AlphaEdit batch update for ``records``. A non-finite loss or update undoes
        every change of this call (weights and C_prev)."""
        backbone = self.backbone
        assert backbone is not None
        # the edit request: the edit prompt alone, never the record's scored prompts
        prompts = [edit_request(r, self.templates).prompt for r in records]
        batch = backbone.prepare(prompts)
        positions = last_prompt_positions(batch)
        weights = self._weights()
        self.snapshot.save(weights)
        before = {n: w.detach().clone() for n, w in weights.items()}
        c_before = {layer: c.clone() for layer, c in self.c_prev.items()}
        outcome = EditOutcome()
        frozen = only_trainable(backbone.model, [])  # δ is the only trainable tensor
        try:
            targets = [self._target_vector(backbone.prepare([p]), outcome) for p in prompts]
            ok = all(t is not None for t in targets) and self._update(
                batch, positions, torch.stack(targets), outcome)  # type: ignore[arg-type]
        finally:
            frozen.restore()
        if not ok:
            _copy_back(weights, before)
            self.c_prev = c_before
            outcome.ok = False
            outcome.message = "non-finite loss or update; the edits of this call are undone"
        return outcome

    def _update(self, batch: ModelBatch, positions: torch.Tensor, targets: torch.Tensor,
                outcome: EditOutcome) -> bool:
        """Steps 3-5 of the module docstring. False when an update is not finite."""
        assert self.backbone is not None
        mods = self.backbone.modules
        for i, layer in enumerate(self._layers):
            keys, current = self._keys_and_outputs(batch, positions)
            k = keys[layer].T                                         # [ffn_dim, n]
            resid = (targets - current).T / (len(self._layers) - i)   # [hidden, n]
            delta = self._solve(layer, k, resid)                      # [hidden, ffn_dim]
            if not torch.isfinite(delta).all():
                return False
            weight = mods.ffn_out(layer).weight
            with torch.no_grad():
                weight.add_(delta.to(weight.dtype))
            outcome.extra[f"delta_norm[{layer}]"] = float(delta.norm())
        keys, current = self._keys_and_outputs(batch, positions)
        for layer in self._layers:
            self.c_prev[layer] += keys[layer].T @ keys[layer]
        outcome.final_loss = float((targets - current).norm(dim=1).mean())
        return True

    def _solve(self, layer: int, k: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """ΔW = [(P (K1K1ᵀ + C_prev) + L2·I)⁻¹ P K1 Rᵀ]ᵀ (AlphaEdit Eq. 14, the authors' form)."""
        p = self.projectors[layer]
        eye = torch.eye(p.shape[0], device=p.device, dtype=p.dtype)
        lhs = p @ (k @ k.T + self.c_prev[layer]) + self.L2 * eye
        return torch.linalg.solve(lhs, p @ k @ resid.T).T

    @torch.no_grad()
    def _keys_and_outputs(self, batch: ModelBatch, positions: torch.Tensor
                          ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Per edited layer the ``ffn_out`` inputs at each row's key position [n, ffn_dim], and
        the last edited layer's output there [n, hidden], float32, from one forward."""
        assert self.backbone is not None
        rows = torch.arange(len(batch), device=positions.device)
        captured: dict[str, torch.Tensor] = {}

        def read(hidden: torch.Tensor) -> None:
            captured["z"] = hidden.detach()

        with self._at_last_layer(read):
            keys = self.backbone.ffn_keys(batch, self._layers)
        at = {layer: k[rows, positions].float() for layer, k in keys.items()}
        return at, captured["z"][rows, positions].float()

    @contextmanager
    def _at_last_layer(self, change: Any) -> Iterator[None]:
        """Run ``change(hidden [rows, seq, d])`` on the last edited layer's output in every
        forward of the block; a tensor it returns replaces that output."""
        assert self.backbone is not None
        layer_module = self.backbone.modules.language_layer(self._layers[-1])

        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            new = change(_hidden(output))
            return None if new is None else _with_hidden(output, new)

        handle = layer_module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _target_vector(self, batch: ModelBatch, outcome: EditOutcome) -> torch.Tensor | None:
        """z = z₀ + δ for one edit prompt (step 1 of the module docstring); None when the loss
        is not finite."""
        backbone = self.backbone
        assert backbone is not None
        position = int(last_prompt_positions(batch)[0])
        state: dict[str, torch.Tensor] = {}

        def add_delta(hidden: torch.Tensor) -> torch.Tensor:
            if "z0" not in state:
                state["z0"] = hidden[0, position].detach().float()
                state["delta"] = torch.zeros_like(state["z0"], requires_grad=True)
            bump = torch.zeros_like(hidden)
            bump[0, position] = state["delta"].to(hidden.dtype)
            return hidden + bump

        optimizer: torch.optim.Optimizer | None = None
        with self._at_last_layer(add_delta):
            for _ in range(self.v_steps):
                nll = backbone.nll(batch, backbone.forward(batch))
                delta, z0 = state["delta"], state["z0"]
                loss = nll + target_weight_decay(delta, z0, self.v_weight_decay)
                outcome.final_loss = loss.item()
                if not math.isfinite(outcome.final_loss):
                    return None
                if self.v_early_stop is not None and nll.item() < self.v_early_stop:
                    break
                optimizer = optimizer or torch.optim.Adam([delta], lr=self.v_lr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                outcome.steps += 1
                with torch.no_grad():  # MEMIT's clamp: δ stays within a ball around z₀
                    max_norm = self.clamp_norm_factor * z0.norm()
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
        return (state["z0"] + state["delta"]).detach()

    def restore(self) -> None:
        """Copy back the edited matrices and forget the stream's keys (C_prev = 0)."""
        self.snapshot.restore()
        if self.projectors:
            self._reset_stream()


def target_weight_decay(delta: torch.Tensor, z0: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight``·‖δ‖/‖z₀‖², the target-vector loss's decay term exactly as the authors'
    ``compute_z`` (AlphaEdit/compute_z.py, MEMIT's memit/compute_z.py) writes it:
    ``v_weight_decay * (torch.norm(delta) / torch.norm(target_init) ** 2)``. The norm is not
    squared, so the term is not scale-free; the authors' ``v_weight_decay`` (0.5) means what it
    means only in this form."""
    return weight * delta.norm() / z0.norm().pow(2)


@torch.no_grad()
def _copy_back(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(values[name])
