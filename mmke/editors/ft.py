"""FT: fine-tune chosen modules (default: the FFN of the last three language layers) on the edit.

The FT baseline of ODEdit Table 1 and ASAM Table 1 ("directly tunes the last three layers").
Loss: NLL of the new target given image + edit prompt, plus any regularizer terms.

End token: like EasyEdit's FT, the loss labels the target tokens only (``append_eos=False``), so
the edited model learns to say the new answer but not to stop after it; greedy generation then
runs on past the answer while teacher-forced accuracy is perfect (the "Mirage" of arXiv
2502.11177). ``append_eos=True`` also labels the backbone's end token after the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mmke.data.prompts import edit_prompts
from mmke.data.record import EditRecord
from mmke.editors.base import EditOutcome, Editor
from mmke.editors.snapshot import WeightSnapshot, named_parameters_of, only_trainable
from mmke.regularizers.base import EditContext, Regularizer, RegularizerStep, edit_requests


#: roles that modify a language layer (the others, projector and vision tower, do not)
PER_LAYER_ROLES = {"ffn_in", "ffn_out", "ffn_gate", "attention", "layer"}


class FineTune(Editor):
    """Adam on the selected modules for up to ``steps`` steps, stopping once the edit loss falls
    below ``early_stop_loss``. ``layers`` index language layers (negative from the end), ``roles``
    name per-layer modules (``ffn_in``, ``ffn_out``, ``attention``, ``layer``). ``append_eos``
    adds the end token after the target to the edit loss (default off, as EasyEdit)."""

    def __init__(self, layers: Sequence[int] = (-3, -2, -1),
                 roles: Sequence[str] = ("ffn_in", "ffn_out"), lr: float = 5e-3, steps: int = 25,
                 weight_decay: float = 0.0, early_stop_loss: float | None = 1e-2,
                 append_eos: bool = False, regularizer: Regularizer | None = None, name: str = "ft") -> None:
        super().__init__(regularizer, name)
        if steps < 1 or lr <= 0:
            raise ValueError("editor.steps must be >= 1 and editor.lr > 0")
        self.layers, self.roles = list(layers), list(roles)
        self.lr, self.steps, self.weight_decay = lr, steps, weight_decay
        self.early_stop_loss = early_stop_loss
        self.append_eos = append_eos
        self.snapshot = WeightSnapshot()  # what restore() copies back: only the edited tensors

    def _edited_parameters(self) -> dict[str, torch.nn.Parameter]:
        assert self.backbone is not None
        mods = self.backbone.modules
        return named_parameters_of({f"{role}[{mods.resolve_layer(i)}]": mods.by_role(role, i)
                                    for i in self.layers for role in self.roles})

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        backbone = self.backbone
        assert backbone is not None
        params = self._edited_parameters()
        self.snapshot.save(params)
        before = {n: p.detach().clone() for n, p in params.items()}  # to undo a failed edit only
        batch = backbone.prepare([edit_prompts(r, self.templates)[0] for r in records],
                                 append_eos=self.append_eos)
        optimizer = torch.optim.Adam(params.values(), lr=self.lr, weight_decay=self.weight_decay)
        trainable = only_trainable(backbone.model, params.values())
        outcome = EditOutcome()
        try:
            if self.regularizer.active:  # the regularizer sees edit requests, never the records
                mods = backbone.modules
                layers = sorted({mods.resolve_layer(i) for i in self.layers}) \
                    if set(self.roles) & PER_LAYER_ROLES else []
                requests = edit_requests(records, self.templates, self.regularizer.reveals)
                self.regularizer.begin(requests, EditContext(layers, params, batch))
            for step in range(self.steps):
                out = backbone.forward(batch, output_hidden_states=self.regularizer.needs_hidden_states)
                task_loss = backbone.nll(batch, out)
                loss = task_loss + self.regularizer.loss(RegularizerStep(step, batch, out, task_loss))
                outcome.final_loss = loss.item()
                if not math.isfinite(outcome.final_loss):
                    _copy_back(params, before)
                    return EditOutcome(ok=False, steps=step, final_loss=outcome.final_loss,
                                       message=f"non-finite loss at step {step}; edit undone")
                if self.early_stop_loss is not None and task_loss.item() < self.early_stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.regularizer.after_step()
                outcome.steps = step + 1
        finally:
            trainable.restore()
            self.regularizer.end()
        return outcome

    def restore(self) -> None:
        self.snapshot.restore()
        self.regularizer.reset()


@torch.no_grad()
def _copy_back(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(values[name])
