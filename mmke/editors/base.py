"""The Editor contract: ``edit`` changes the model, ``restore`` brings it back bit-identical.

Designed for every family of editor the papers compare:
- weight editors (FT, MEND, AlphaEdit, M-ORE) change parameters and keep a ``WeightSnapshot``;
- hook/memory editors (WISE, T-Patcher, GRACE) attach modules or hooks and detach them;
- prompt editors (IKE) rewrite prompts through ``prepare_prompts``;
- trained editors (MEND, SERAC, LiveEdit) fit editor networks once on the train split in ``fit``
  (``mmke.editors.training``: cached on disk, resumable).
An evaluator only ever calls ``prepare_prompts``, ``forward`` and ``generate`` (generated-answer
scoring), so all of these plug in alike.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmke.backbones.base import Backbone, ForwardOutput, ModelBatch
from mmke.cost import MemoryMeter
from mmke.data.record import EditRecord, Prompt
from mmke.data.prompts import PromptTemplates
from mmke.errors import ConfigError
from mmke.regularizers.base import NoRegularizer, Regularizer, TrainRecords

if TYPE_CHECKING:
    from mmke.editors.training import FitReport


@dataclass
class EditOutcome:
    """What one call of ``edit`` did. A failed edit (NaN/inf loss) leaves the model restored.
    Memory in MiB as ``mmke.cost.MemoryMeter`` measures it."""

    ok: bool = True
    steps: int = 0
    final_loss: float | None = None
    seconds: float = 0.0
    message: str = ""
    peak_mem_mb: float | None = None
    incremental_mem_mb: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def fail_non_finite(self) -> None:
        """Mark the call failed on a non-finite loss (the editor has undone its edits)."""
        self.ok = False
        self.message = (f"non-finite loss after {self.steps} steps; "
                        "the edits of this call are undone")


class Editor(ABC):
    """Base class of all editors. Subclasses take typed hyperparameters in ``__init__``."""

    #: whether ``fit`` must run on the train split before editing (MEND, SERAC)
    needs_training: bool = False
    #: whether extra loss terms from a Regularizer can enter this editor's optimisation
    accepts_regularizer: bool = True

    def __init__(self, regularizer: Regularizer | None = None, name: str = "") -> None:
        self.name = name or type(self).__name__.lower()
        self.regularizer = regularizer if regularizer is not None else NoRegularizer()
        self.backbone: Backbone | None = None
        self.templates = PromptTemplates()
        self.meter: MemoryMeter | None = None

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        """Bind the editor to a backbone and the task's prompt templates (called once by the runner).
        ``train_records``: a zero-argument callable giving the train split, for regularizers that
        draw out-of-scope samples or neighbours from it (called only if one does)."""
        if self.regularizer.active and not self.accepts_regularizer:
            raise TypeError(
                f"{type(self).__name__} has no loss-based optimisation, so regularizer "
                f"{type(self.regularizer).__name__} cannot be plugged in; use reg=none")
        self.backbone = backbone
        self.templates = templates
        if self.regularizer.active:
            self.regularizer.attach(backbone, templates, train_records)
        self.meter = MemoryMeter(backbone.device)  # its baseline: memory before the first edit

    def _resolve_layer(self, layer: int) -> int:
        """``editor.layer`` as an absolute language-layer index; a ConfigError names the setting."""
        assert self.backbone is not None
        try:
            return self.backbone.modules.resolve_layer(layer)
        except IndexError as err:
            raise ConfigError(f"editor.layer={layer}: {err}") from err

    def fit(self, train_records: Sequence[EditRecord]) -> FitReport | None:
        """Train editor networks on the train split (after ``attach``); editors that need none
        have nothing to do. ``mmke.editors.training.TrainedEditor`` trains once and caches."""
        return None

    def check_records(self, records: Sequence[EditRecord]) -> None:
        """Raise a ConfigError before the first edit if this run's ``records`` cannot be edited
        as configured (IKE: prompts with k demonstrations past the backbone's context). Called by
        the runner after ``attach`` and ``fit``; nothing to check here."""
        return None

    def edit(self, records: Sequence[EditRecord]) -> EditOutcome:
        """Apply the edits of ``records`` (one record in the single protocol) on top of the current
        state. Times the work and measures its peak memory; subclasses implement ``_apply``."""
        if self.backbone is None or self.meter is None:
            raise RuntimeError("attach(backbone, templates) before edit()")
        self.meter.start()
        start = time.perf_counter()
        outcome = self._apply(records)
        outcome.seconds = time.perf_counter() - start
        memory = self.meter.stop()
        outcome.peak_mem_mb = memory.peak_mem_mb
        outcome.incremental_mem_mb = memory.incremental_mem_mb
        return outcome

    @abstractmethod
    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome: ...

    @abstractmethod
    def restore(self) -> None:
        """Undo every edit since the last restore; the model is bit-identical to before."""

    def prepare_prompts(self, prompts: Sequence[Prompt]) -> list[Prompt]:
        """Rewrite prompts before they are tokenized (IKE prepends demonstrations). Identity here."""
        return list(prompts)

    def forward(self, batch: ModelBatch, output_hidden_states: bool = False) -> ForwardOutput:
        """The edited model's forward. Routing editors (SERAC) override it."""
        assert self.backbone is not None
        return self.backbone.forward(batch, output_hidden_states=output_hidden_states)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """The edited model's greedy answers to ``prompts`` (their targets are never read), for
        generated-answer scoring. Prompts pass through ``prepare_prompts`` first, as for scoring.

        Routing editors that override ``forward`` (SERAC) must override this too: the default
        decodes with the backbone's own model, which would bypass their route and score the
        unedited answer."""
        if self.backbone is None:
            raise RuntimeError("attach(backbone, templates) before generate()")
        return self.backbone.generate(self.prepare_prompts(prompts), max_new_tokens=max_new_tokens)


class NoEdit(Editor):
    """``editor=none``: evaluates the unedited model (the papers' "Pre-edited" rows)."""

    accepts_regularizer = False

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        return EditOutcome(ok=True, steps=0)

    def restore(self) -> None:
        return None
