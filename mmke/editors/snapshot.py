"""Copies of exactly the tensors an editor changes, so ``restore`` is cheap and bit-identical, and
the ``requires_grad`` flags an edit flips while it trains."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


class WeightSnapshot:
    """Saves a parameter the first time it is about to change; ``restore`` copies every saved
    tensor back in place (same storage, so optimizers and hooks see the same objects)."""

    def __init__(self) -> None:
        self._saved: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}

    def save(self, params: Mapping[str, nn.Parameter]) -> None:
        for name, param in params.items():
            if name not in self._saved:
                self._saved[name] = (param, param.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        for param, original in self._saved.values():
            param.copy_(original)
        self._saved.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self._saved.values())

    def __len__(self) -> int:
        return len(self._saved)


def named_parameters_of(modules: Mapping[str, nn.Module]) -> dict[str, nn.Parameter]:
    """``{"<module label>.<param name>": parameter}`` for every parameter of the given modules."""
    return {f"{label}.{pname}": p for label, module in modules.items()
            for pname, p in module.named_parameters()}


class RequiresGrad:
    """Remembers every parameter's ``requires_grad`` so it can be put back after an edit."""

    def __init__(self, model: nn.Module) -> None:
        self._flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)


def only_trainable(model: nn.Module, params: Iterable[nn.Parameter]) -> RequiresGrad:
    """Freeze everything but ``params`` (autograd then skips the rest of the model); the returned
    object's ``restore`` puts every flag back. ``params`` may lie outside ``model`` (a codebook's
    values), or be empty."""
    saved = RequiresGrad(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return saved
