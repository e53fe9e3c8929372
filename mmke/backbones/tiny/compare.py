"""How far two builds of one tiny family lie apart, weight by weight: a rebuild on this machine
against the build in a cache (``benchmarks/rebuild_tiny.py``), since float builds follow the
CPU's kernels (``mmke.backbones.tiny.builder``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass(frozen=True)
class BuildDifference:
    """Two builds' weights side by side: tensors compared, how many differ, the largest
    absolute difference, and whether every weight file holds the same tensors bit for bit."""

    tensors: int
    differing: int
    max_abs: float

    @property
    def identical(self) -> bool:
        return self.differing == 0


WEIGHT_SUFFIXES = (".safetensors", ".pth")  # MiniGPT-4's projection is a torch file, as released


def weight_files(folder: Path) -> list[Path]:
    """Every weight file of a build, relative to it (MiniGPT-4 keeps its Llama below)."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*")
                  if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file, nested dictionaries (a ``.pth``'s ``{"model": ...}``)
    flattened to dotted names."""
    if path.suffix != ".pth":
        return load_file(str(path))
    flat: dict[str, torch.Tensor] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, torch.Tensor):
                flat[f"{prefix}{key}"] = value

    walk(torch.load(path, map_location="cpu", weights_only=True), "")
    return flat


def build_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a build, named ``<folder>/<tensor>`` for safetensors (a sharded model's
    shards merged, so a shipped build compares with an unsharded one) and ``<file>:<tensor>``
    for torch files."""
    tensors: dict[str, torch.Tensor] = {}
    for rel in weight_files(folder):
        prefix = f"{rel.parent.as_posix()}/" if rel.suffix == ".safetensors" else f"{rel}:"
        tensors.update({prefix + k: v for k, v in load_weights(folder / rel).items()})
    return tensors


def compare_builds(a: Path, b: Path) -> BuildDifference:
    """Compare the weights of two builds of one family; a tensor only one of them has is an
    error (they are not builds of the same model)."""
    left, right = build_tensors(a), build_tensors(b)
    if left.keys() != right.keys():
        only = sorted(left.keys() ^ right.keys())
        raise ValueError(f"{a} and {b} hold different tensors: {only[:5]}")
    differing = 0
    max_abs = 0.0
    for key, x in left.items():
        y = right[key]
        if not (x.shape == y.shape and x.dtype == y.dtype and bool((x == y).all())):
            differing += 1
            max_abs = max(max_abs, float((x.double() - y.double()).abs().max()))
    return BuildDifference(len(left), differing, max_abs)
