"""Devices and precision from configuration; no accelerator name is ever spelled in the code."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (or None) picks the current accelerator when one exists, else the CPU."""
    if spec in (None, "", "auto"):
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        return accelerator if accelerator is not None else torch.device("cpu")
    return torch.device(spec)


def resolve_dtype(spec: str | torch.dtype) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        return spec
    try:
        return DTYPES[spec]
    except KeyError:
        raise ValueError(f"unknown dtype '{spec}'; use one of {sorted(DTYPES)}") from None
