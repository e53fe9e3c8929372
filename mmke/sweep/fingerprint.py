"""A cheap fingerprint of a model's state, to prove a reused backbone is the one that was loaded.

Every tensor of the state dict (parameters and buffers) is reduced, on its own device, to two
64-bit integers computed from its raw bits: their sum, and their sum weighted by position. A
change of any single element changes the weighted sum (the bit difference times a position
weight below 2**32 is never 0 modulo 2**64), and no float rounding is involved, so a restore
that is off by one ulp is caught. Besides the weights, the fingerprint covers what else an
editor may change on the model: ``requires_grad`` flags, train/eval mode and registered hooks.

Cost: one pass over the weights on their device, in chunks (no full copy of the model): about
as much as one forward pass, far less than loading the weights again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Elements reduced at a time, bounding the temporary int64 memory to 2 x 128 MiB.
CHUNK = 1 << 24

#: Integer dtypes of the same width as each element size, to read a tensor's raw bits.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: What ``model_fingerprint`` returns: nested tuples, compared with ``==``.
Fingerprint = tuple[Any, ...]


@torch.no_grad()
def tensor_fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    """(sum of the raw bits, position-weighted sum), both modulo 2**64, of ``tensor``."""
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.int8)
    bits = flat.view(_BITS[flat.element_size()])
    plain = weighted = 0
    for start in range(0, bits.numel(), CHUNK):
        part = bits[start:start + CHUNK].to(torch.int64)
        weights = torch.arange(start + 1, start + 1 + part.numel(), dtype=torch.int64,
                               device=part.device)
        plain += int(part.sum())
        weighted += int((part * weights).sum())  # int64 arithmetic wraps: a sum modulo 2**64
    return plain & 0xFFFFFFFFFFFFFFFF, weighted & 0xFFFFFFFFFFFFFFFF


#: Where transformers defines the hooks it installs on a model itself: the output recorders
#: that collect hidden states and attentions, put on every layer by the first forward that asks
#: for them (``output_hidden_states=True``: ODEdit, ASAM) and kept for the model's life. They are
#: inert in every other forward, so they are not an editor's leftover.
LIBRARY_HOOK_MODULES = ("transformers.",)


def _is_library_hook(hook: object) -> bool:
    return str(getattr(hook, "__module__", "") or "").startswith(LIBRARY_HOOK_MODULES)


def hook_count(model: nn.Module) -> int:
    """Forward/backward hooks registered on any submodule, less the ones transformers installs
    itself (``LIBRARY_HOOK_MODULES``). ``nn.Module`` offers no public count, so its hook
    dictionaries are read: a hook an editor forgot to remove would change every later forward
    without touching a weight."""
    total = 0
    for module in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks"):
            total += sum(not _is_library_hook(h) for h in getattr(module, name, {}).values())
    return total


def model_fingerprint(model: nn.Module) -> Fingerprint:
    """Everything of ``model`` that a job may change and the next job must not inherit."""
    tensors = tuple((name, tuple(t.shape), str(t.dtype), str(t.device), tensor_fingerprint(t))
                    for name, t in model.state_dict(keep_vars=False).items())
    grads = tuple(p.requires_grad for p in model.parameters())
    modes = tuple(m.training for m in model.modules())
    return tensors, grads, modes, hook_count(model)
