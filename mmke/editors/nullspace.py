"""AlphaEdit's retained-knowledge statistic K0K0ᵀ and its null-space projector, cached on disk.

K0 holds the keys (inputs of ``ffn_out``) of knowledge the edits must leave alone. The
statistic kept per layer is the second moment K0K0ᵀ / n (the authors' ``get_cov``, so their
threshold 1e-2 applies to the same scale). Building it is one pass over train-split prompts; the
file is ``<cache_dir>/alphaedit_k0/<key>.safetensors``, where the key hashes the backbone's
weights, the prompts in order, the layers and the batch size. The projector threshold is not in
the key: P is recomputed from the stored statistic at load, so a threshold sweep reads one file.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from mmke.backbones.base import Backbone
from mmke.data.record import Prompt
from mmke.progress import progress_bar
from mmke.results.atomic import atomic_write_bytes
from mmke.sweep.fingerprint import tensor_fingerprint


class KeyStatisticsWarning(UserWarning):
    """A cached K0 file was unreadable or did not match, and is being rebuilt."""


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U_0 U_0ᵀ, U_0 the eigenvectors of the symmetric ``cov`` whose eigenvalues lie below
    ``threshold`` (AlphaEdit §3.2: P K0 ≈ 0, so an update W + ΔP leaves W K0 as it was)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
    kept = eigenvectors[:, eigenvalues < threshold]
    return (kept @ kept.T).to(cov.dtype)


def backbone_fingerprint(backbone: Backbone) -> str:
    """A hash of the model's every tensor (raw bits), so edited or retrained weights never read
    the statistic of other weights."""
    digest = hashlib.sha256(backbone.family.encode())
    for name, tensor in backbone.model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{tensor_fingerprint(tensor)}"
                      .encode())
    return digest.hexdigest()


def statistics_key(fingerprint: str, prompts: Sequence[Prompt], layers: Sequence[int],
                   batch_size: int) -> str:
    """What the statistic depends on: weights, the exact prompts (text, picture, target) in
    order, the absolute layers, and the batch size (padding changes nothing, but rounding can)."""
    digest = hashlib.sha256(json.dumps([fingerprint, list(layers), batch_size]).encode())
    for p in prompts:
        image = "" if p.image is None else str(p.image.path)
        digest.update(json.dumps([p.text, p.target, image]).encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def key_second_moments(backbone: Backbone, prompts: Sequence[Prompt], layers: Sequence[int],
                       batch_size: int, progress: bool = True) -> dict[int, torch.Tensor]:
    """K0K0ᵀ / n per layer, over every attended position (image, question and the teacher-forced
    answer tokens) of ``prompts``: float32 on the CPU, [ffn_dim, ffn_dim]."""
    sums: dict[int, torch.Tensor] = {}
    count = 0
    batches = range(0, len(prompts), batch_size)
    for start in progress_bar(batches, desc="AlphaEdit K0", disable=not progress):
        batch = backbone.prepare(prompts[start:start + batch_size])
        attended = batch.attention_mask.bool()
        for layer, keys in backbone.ffn_keys(batch, layers).items():
            k = keys[attended].double()                    # [n_positions, ffn_dim]
            sums[layer] = sums.get(layer, 0) + (k.T @ k).cpu()
        count += int(attended.sum())
    return {layer: (s / max(count, 1)).float() for layer, s in sums.items()}


def _read(path: Path, key: str, layers: Sequence[int]) -> dict[int, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            stored = (f.metadata() or {}).get("key")
            covs = {layer: f.get_tensor(f"cov.{layer}") for layer in layers
                    if f"cov.{layer}" in f.keys()}
    except (SafetensorError, OSError) as exc:
        why = f"unreadable ({exc})"
    else:
        if stored != key:
            why = f"stored key {stored!r} is not {key!r}"
        elif len(covs) != len(layers) or not all(torch.isfinite(c).all() for c in covs.values()):
            why = "missing layers or non-finite values"
        else:
            return covs
    warnings.warn(f"rebuilding AlphaEdit K0 {path}: {why}", KeyStatisticsWarning, stacklevel=3)
    return None


def cached_second_moments(backbone: Backbone, prompts: Sequence[Prompt], layers: Sequence[int],
                          cache_dir: str | Path, batch_size: int,
                          progress: bool = True) -> tuple[dict[int, torch.Tensor], Path, bool]:
    """``key_second_moments``, read from the cache when built before. Returns the statistic,
    its file, and whether it was built now. Written atomically: a concurrent job that builds the
    same file writes the same content, and a reader never sees half of it."""
    key = statistics_key(backbone_fingerprint(backbone), prompts, layers, batch_size)
    path = Path(cache_dir) / "alphaedit_k0" / f"{key}.safetensors"
    covs = _read(path, key, layers)
    if covs is not None:
        return covs, path, False
    covs = key_second_moments(backbone, prompts, layers, batch_size, progress)
    payload = save({f"cov.{layer}": c.contiguous() for layer, c in covs.items()},
                   metadata={"key": key, "n_prompts": str(len(prompts)),
                             "layers": json.dumps(list(layers))})
    atomic_write_bytes(path, payload)
    return covs, path, True
