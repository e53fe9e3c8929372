"""An optimiser's state as flat named tensors (``<index>.<name>``: Adam's moments and its step
counter per parameter) and back: what a safetensors checkpoint can hold. The parameter groups
(learning rates, flags) are settings, not tensors: the caller keeps or rebuilds them."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``{"<param index>.<state name>": tensor}`` on the CPU, copied."""
    return {f"{index}.{name}": torch.as_tensor(value).detach().cpu().clone().contiguous()
            for index, entry in optimizer.state_dict()["state"].items()
            for name, value in entry.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                           param_groups: list[dict] | None = None) -> None:
    """Put back what ``optimizer_tensors`` returned; ``param_groups``: the saved groups (None:
    the optimiser's own, as built)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"] if param_groups is None else param_groups
    optimizer.load_state_dict({"state": state, "param_groups": groups})
