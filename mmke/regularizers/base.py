"""The Regularizer contract: extra loss terms a loss-based editor adds at every optimisation step.

ODEdit (KL locality + MMD generality + IRM-TV) and ASAM (adversarial latent variants + rank-
constrained alignment) both need: the backbone (for extra forwards and ``inputs_embeds``), the
edit request, the edit forward's hidden states, the editor's edit layers and trainable
parameters, outputs of the model before the edit, and samples drawn from the train split.

Lifecycle, and what each call receives:
- ``attach(backbone, templates, train_records)`` once, from ``Editor.attach``: ``train_records``
  is a zero-argument callable returning the train split (the runner passes a lazy one, so the
  split is read only if a regularizer draws from it: ``needs_train_records``).
- ``begin(requests, context)`` before the first step of each edit, model still unedited for
  this edit. ``requests`` are ``EditRequest``s, never the scored ``EditRecord``: the edit prompt
  and target, plus opaque fingerprints of the prompts that will be scored for the record, which
  the train-split pool uses to refuse any sample that *is* a scored prompt (no leakage by
  construction: a regularizer cannot read a rephrase or locality prompt of the record).
  The one exception is an explicit leaky setting (ODEdit ``neighbours=record_rephrase``,
  ``out_of_scope=record_locality``): the regularizer's ``reveals`` names the kinds of the
  record's scored prompts it is handed (``EditRequest.revealed``), and the runner writes
  ``leaky: true`` and what leaked into the run's summary. Empty by default.
  ``context`` says which layers the editor modifies and which parameters it trains.
- ``loss(step)`` once per optimisation step; ``after_step()`` after the editor's optimiser step
  (ODEdit's dual ascent); ``end()`` after the last step.
- ``training_state()`` / ``load_training_state(state)``: what the regularizer has learnt and
  carries from edit to edit (ODEdit's λ network and its Adam moments), as named tensors. A trained
  editor whose objective holds the regularizer's terms (MEND) checkpoints it with its networks,
  so a killed fit resumes to what an uninterrupted one gives. None by default.

Adding a regularizer to a new loss-based editor (WISE, T-Patcher, MEND, UniKE) takes: build the
requests with ``edit_requests(records, templates, regularizer.reveals)``, call ``begin`` with an
``EditContext``, forward with ``output_hidden_states=regularizer.needs_hidden_states``, add
``loss(RegularizerStep(...))`` to the editor's loss, call ``after_step()`` after each optimiser
step and ``end()`` in a finally.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mmke.backbones.base import Backbone, ForwardOutput, ModelBatch
from mmke.data.prompts import (LOCALITY_SETS, PromptTemplates, edit_prompts,
                               locality_set_prompts, portability_prompts)
from mmke.data.record import EditRecord, Prompt
from mmke.errors import ConfigError, MMKEError

TrainRecords = Callable[[], Sequence[EditRecord]]

#: kinds of a record's scored prompts that a leaky setting may hand a regularizer: the text and
#: image rephrase (T-Gen, M-Gen) and the text and multimodal locality prompts (T-Loc, M-Loc)
REVEALABLE: tuple[str, ...] = ("t_gen", "m_gen", "t_loc", "m_loc")


def prompt_key(prompt: Prompt) -> str:
    """An opaque fingerprint of a prompt's input (text and picture; the target is ignored, so a
    scored prompt with any target counts as seen)."""
    image = str(prompt.image.path) if prompt.image is not None else ""
    return hashlib.sha1(f"{prompt.text}\x00{image}".encode()).hexdigest()


def scored_prompts(record: EditRecord, templates: PromptTemplates) -> list[Prompt]:
    """Every prompt an evaluator may score for ``record`` besides the edit prompt itself: text and
    image rephrase, text and multimodal locality, one-hop questions, and the locality sets the
    record has fields for. Used only to fingerprint them."""
    prompts = list(edit_prompts(record, templates)[1:]) + portability_prompts(record, templates)
    for name in LOCALITY_SETS:
        try:
            prompts += locality_set_prompts(record, templates, name)
        except MMKEError:  # the record lacks the fields of that set: nothing of it is scored
            continue
    return prompts


@dataclass(frozen=True)
class EditRequest:
    """What an editor and its regularizer may know of one edit: the edit prompt (image, question,
    new target), the question kind when the data has one (mini world: ``extras['kind']``), and
    fingerprints of the record's scored prompts (not the prompts). ``revealed`` is empty unless
    the regularizer opted into a leaky setting: then it holds those of the record's scored
    prompts whose kinds the regularizer's ``reveals`` names."""

    prompt: Prompt
    task: str = "vqa"
    kind: str = ""
    uid: str = ""
    scored: frozenset[str] = field(default_factory=frozenset)
    revealed: tuple[Prompt, ...] = ()

    def is_scored(self, prompt: Prompt) -> bool:
        return prompt_key(prompt) in self.scored

    def revealed_of(self, kinds: Sequence[str]) -> list[Prompt]:
        """The revealed prompts of ``kinds``, in that order; ``ConfigError`` when one is missing
        (an editor that built its requests without the regularizer's ``reveals``)."""
        by_kind = {p.kind: p for p in self.revealed}
        missing = [k for k in kinds if k not in by_kind]
        if missing:
            raise ConfigError(
                f"a leaky regularizer setting needs the record's {', '.join(missing)} prompt(s), "
                "but the edit request does not carry them: the editor must build its requests "
                "with edit_requests(records, templates, regularizer.reveals)")
        return [by_kind[k] for k in kinds]


def edit_request(record: EditRecord, templates: PromptTemplates,
                 reveal: Collection[str] = frozenset()) -> EditRequest:
    """The request for ``record``; ``reveal``: kinds of its scored prompts to hand over (a leaky
    opt-in, see ``REVEALABLE``), none by default."""
    unknown = sorted(set(reveal) - set(REVEALABLE))
    if unknown:
        raise ValueError(f"cannot reveal {unknown}: only {REVEALABLE}")
    prompts = edit_prompts(record, templates)
    return EditRequest(prompt=prompts[0], task=record.task,
                       kind=str(record.extras.get("kind", "")), uid=record.uid,
                       scored=frozenset(prompt_key(p) for p in scored_prompts(record, templates)),
                       revealed=tuple(p for p in prompts[1:] if p.kind in reveal))


def edit_requests(records: Sequence[EditRecord], templates: PromptTemplates,
                  reveal: Collection[str] = frozenset()) -> list[EditRequest]:
    return [edit_request(r, templates, reveal) for r in records]


@dataclass
class EditContext:
    """What the editor tells the regularizer about itself for one edit."""

    #: absolute indices of the language layers the editor modifies (ASAM reads the deepest one's
    #: output); empty for editors that change only vision-side modules (FT-M)
    edit_layers: list[int]
    #: the parameters the editor trains, by name (ODEdit's λ network reads them)
    trainable: dict[str, torch.nn.Parameter]
    #: the editor's own edit batch (the requests' edit prompts, as the editor tokenized them)
    batch: ModelBatch | None = None


@dataclass
class RegularizerStep:
    """What a regularizer sees at one optimisation step of an editor."""

    step: int
    batch: ModelBatch
    output: ForwardOutput
    task_loss: torch.Tensor


class Regularizer:
    """Base class; ``NoRegularizer`` is the do-nothing case, not ``None``."""

    #: False only for NoRegularizer; editors without a loss may refuse an active regularizer
    active: bool = True
    #: hidden states the regularizer needs from the editor's forward
    needs_hidden_states: bool = False
    #: whether ``attach`` must be given the train split (out-of-scope samples, neighbours)
    needs_train_records: bool = False
    #: kinds (``REVEALABLE``) of the record's scored prompts this regularizer reads: empty but
    #: for a leaky opt-in, which the run's summary then flags (``leak_summary``)
    reveals: frozenset[str] = frozenset()

    def __init__(self, name: str = "") -> None:
        self.name = name or type(self).__name__.lower()
        self.backbone: Backbone | None = None
        self.templates = PromptTemplates()
        self._train_loader: TrainRecords | None = None

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        """Bind to the editor's backbone and the task's templates (called by ``Editor.attach``)."""
        if self.needs_train_records and train_records is None:
            raise ConfigError(
                f"reg={self.name} draws out-of-scope samples and neighbours from the train split, "
                "but the editor was attached without train records (Editor.attach(..., "
                "train_records=lambda: source.records('train')))")
        self.backbone = backbone
        self.templates = templates
        self._train_loader = train_records

    def train_records(self) -> Sequence[EditRecord]:
        if self._train_loader is None:
            raise ConfigError(f"reg={self.name}: no train split was given at attach time")
        return self._train_loader()

    def begin(self, requests: Sequence[EditRequest], context: EditContext) -> None:
        """Called before the first step of an edit, while the model is still unedited."""

    def loss(self, step: RegularizerStep) -> torch.Tensor:
        """Extra loss to add to the editor's task loss at this step."""
        return step.task_loss.new_zeros(())

    def after_step(self) -> None:
        """Called after each optimiser step of the editor (dual updates, schedules)."""

    def end(self) -> None:
        """Called after the last step; drop references to per-edit tensors."""

    def reset(self) -> None:
        """Called by ``Editor.restore``: forget state carried across the edits of a stream."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """The state carried from one edit to the next (learnt parameters, optimiser moments,
        step counters), by name; a resumed fit puts it back with ``load_training_state``. Per-edit
        state (between ``begin`` and ``end``) is not in it: a checkpoint is taken between
        edits. None by default (ASAM: its random starts come from per-edit seeded generators)."""
        return {}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put back what ``training_state`` returned; empty: the state a fresh one starts with."""
        if state:
            raise ValueError(f"reg={self.name} keeps no training state, but was given "
                             f"{sorted(state)}")

    def summary(self) -> dict[str, float | str]:
        """Settings worth recording in the run's summary (e.g. a leaky opt-in)."""
        return {}

    def leak_summary(self) -> dict[str, bool | list[str]]:
        """The run summary's flag: ``leaky`` always, ``leaked`` (the kinds of the record's
        scored prompts the edit saw) when leaky; the table builder reads both."""
        if not self.reveals:
            return {"leaky": False}
        return {"leaky": True, "leaked": [k for k in REVEALABLE if k in self.reveals]}


class NoRegularizer(Regularizer):
    """``reg=none``: adds nothing."""

    active = False
