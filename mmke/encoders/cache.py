"""Embeddings of a list of texts, computed once and kept on disk for every later run and sweep job.

The file is ``<cache_dir>/embeddings/<key>.safetensors``, where the key hashes the encoder's
fingerprint and the exact texts in order: a different encoder, text, or order is a different
file. A file that cannot be read, or whose stored key or shape does not match, is rebuilt with a
warning rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from mmke.results.atomic import atomic_write_bytes

TENSOR = "embeddings"


class TextEncoder(Protocol):
    """What the cache needs of an encoder (``SentenceEncoder`` is one)."""

    cache_dir: Path
    device: torch.device

    @property
    def fingerprint(self) -> str: ...

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor: ...


class EmbeddingCacheWarning(UserWarning):
    """A cached embeddings file was unreadable or did not match, and is being rebuilt."""


def embedding_key(fingerprint: str, texts: Sequence[str]) -> str:
    """A hash of the encoder fingerprint and the texts in order (JSON-encoded, so no separator
    inside a text can make two different lists hash alike)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(fingerprint).encode("utf-8"))
    for text in texts:
        digest.update(b"\n" + json.dumps(text, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:24]


def embedding_path(cache_dir: str | Path, key: str) -> Path:
    """Where the embeddings for ``key`` live under ``cache_dir``."""
    return Path(cache_dir) / "embeddings" / f"{key}.safetensors"


def _read(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The stored embeddings if ``path`` holds exactly those for ``key`` and ``n`` texts, else
    None after a warning saying why (a missing file is a plain miss, without a warning)."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            emb = f.get_tensor(TENSOR) if TENSOR in f.keys() else None
    except (SafetensorError, OSError) as exc:
        why = f"unreadable ({exc})"
    else:
        if metadata.get("key") != key:
            why = f"stored key {metadata.get('key')!r} is not {key!r}"
        elif emb is None or emb.dim() != 2 or emb.shape[0] != n:
            why = f"holds {None if emb is None else tuple(emb.shape)}, not {n} embeddings"
        elif emb.dtype != torch.float32 or not torch.isfinite(emb).all():
            why = "holds non-float32 or non-finite values"
        else:
            return emb
    warnings.warn(f"rebuilding cached embeddings {path}: {why}", EmbeddingCacheWarning,
                  stacklevel=3)
    return None


def cached_encode(encoder: TextEncoder, texts: Sequence[str], cache_dir: str | Path | None = None,
                  batch_size: int | None = None) -> torch.Tensor:
    """``encoder.encode(texts)``, read from ``<cache_dir>/embeddings/`` when computed before.

    ``cache_dir`` defaults to the encoder's own. The result is on ``encoder.device``; the file
    holds it on the CPU. Concurrent jobs may both compute a missing file; the rename makes the
    last one win with identical content.
    """
    texts = list(texts)
    key = embedding_key(encoder.fingerprint, texts)
    path = embedding_path(encoder.cache_dir if cache_dir is None else cache_dir, key)
    emb = _read(path, key, len(texts))
    if emb is None:
        emb = encoder.encode(texts, batch_size=batch_size).detach().to("cpu", torch.float32)
        metadata = {"key": key, "fingerprint": encoder.fingerprint, "n": str(len(texts))}
        atomic_write_bytes(path, save({TENSOR: emb.contiguous()}, metadata=metadata))
    return emb.to(encoder.device)
