"""Editable modules by role for decoder-only language models, given where one layer keeps them.

Each adapter names its attribute paths here once (``LayerRoles(..., ffn_out="mlp.down_proj")``);
nothing outside the adapters ever spells a module path.
"""

from __future__ import annotations

from torch import nn

from mmke.backbones.base import EditableModules


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


class LayerRoles(EditableModules):
    """Roles of a model whose language layers share one layout.

    ``ffn_in`` is the FFN's input matrix whose output is gated or activated (OPT ``fc1``, Llama
    ``up_proj``); ``ffn_out`` is the output matrix whose input rows are the FFN "keys" that
    locate-then-edit methods (ROME/AlphaEdit/M-ORE, T-Patcher) work on. For gated FFNs the gate
    matrix is reachable as role ``ffn_gate``.
    """

    def __init__(self, layers: nn.ModuleList, *, ffn_in: str, ffn_out: str, attention: str,
                 projector: nn.Module, vision_tower: nn.Module, ffn_gate: str | None = None) -> None:
        self._layers = layers
        self._paths = {"ffn_in": ffn_in, "ffn_out": ffn_out, "attention": attention}
        self._gate = ffn_gate
        self._projector = projector
        self._vision_tower = vision_tower

    @property
    def num_language_layers(self) -> int:
        return len(self._layers)

    def language_layer(self, i: int) -> nn.Module:
        return self._layers[i]

    def ffn_in(self, i: int) -> nn.Linear:
        return _get(self._layers[i], self._paths["ffn_in"])

    def ffn_out(self, i: int) -> nn.Linear:
        return _get(self._layers[i], self._paths["ffn_out"])

    def ffn_gate(self, i: int) -> nn.Linear | None:
        """The gate matrix of a gated FFN (SwiGLU), None for a plain two-matrix FFN."""
        return None if self._gate is None else _get(self._layers[i], self._gate)

    def attention(self, i: int) -> nn.Module:
        return _get(self._layers[i], self._paths["attention"])

    def projector(self) -> nn.Module:
        return self._projector

    def vision_tower(self) -> nn.Module:
        return self._vision_tower
