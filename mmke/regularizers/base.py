"""The Regularizer contract: extra loss terms a loss-based editor adds at every optimisation step.

ODEdit (KL locality + MMD generality + IRM-TV) and ASAM (adversarial latent variants + rank-
constrained alignment) both need: the backbone (for extra forwards and ``inputs_embeds``), the
request's prompts (edit, rephrase, locality), the edit forward's hidden states, and outputs of the
model before the edit. ``begin`` receives what is fixed for the whole edit; ``loss`` is called once
per step with that step's forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmke.backbones.base import Backbone, ForwardOutput, ModelBatch
from mmke.data.record import EditRecord
from mmke.data.prompts import PromptTemplates


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

    def __init__(self, name: str = "") -> None:
        self.name = name or type(self).__name__.lower()

    def begin(self, backbone: Backbone, records: Sequence[EditRecord],
              templates: PromptTemplates) -> None:
        """Called before the first step of an edit, while the model is still unedited."""

    def loss(self, step: RegularizerStep) -> torch.Tensor:
        """Extra loss to add to the editor's task loss at this step."""
        return step.task_loss.new_zeros(())

    def end(self) -> None:
        """Called after the last step; drop references to per-edit tensors."""


class NoRegularizer(Regularizer):
    """``reg=none``: adds nothing."""

    active = False
