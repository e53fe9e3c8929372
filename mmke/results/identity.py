"""A run's identity: a hash of what determines its results, and finding a finished run by it.

Two runs with the same identity give the same results, so a sweep that is started again can
skip every job whose result already exists (``resume``). The identity is the resolved config
without the settings that only say *where* things go or *how they are shown*:

- the top-level groups and keys in ``IGNORED_TOP_LEVEL`` (output and cache paths, the logger,
  progress bars, the sweeper's objective, ``resume`` itself, Hydra's own node, and the torch
  thread count ``cpu_threads``, which can change only the last digits of float sums);
- any key named in ``IGNORED_ANYWHERE`` at any depth (``backbone.cache_dir`` is a copy of
  ``paths.cache_dir``; ``backbone.progress`` of ``progress``).

The code version is deliberately not part of it: a resumed sweep keeps the results computed
before a checkout changed (``meta.json`` records the commit of every run).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mmke.results.atomic import to_jsonable
from mmke.results.run_folder import SUMMARY_FILE, RunWriter

#: Top-level keys that never change a run's results.
IGNORED_TOP_LEVEL: frozenset[str] = frozenset(
    {"paths", "logger", "hydra", "progress", "objective", "resume", "cpu_threads"})
#: Keys that never change results wherever they appear (copies of the settings above).
IGNORED_ANYWHERE: frozenset[str] = frozenset({"cache_dir", "progress"})
#: The summary (and meta.json) key that stores the identity.
HASH_KEY = "config_hash"


def identity_config(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines results (see the module docstring)."""
    return {k: _prune(v) for k, v in resolved.items() if k not in IGNORED_TOP_LEVEL}


def config_hash(resolved: Mapping[str, Any]) -> str:
    """A short, stable hash (16 hex digits of SHA-256) of ``identity_config(resolved)``.

    Key order does not matter (keys are sorted); values are compared after JSON conversion, so
    ``5e-3`` and ``0.005`` are the same setting.
    """
    text = json.dumps(to_jsonable(identity_config(resolved)), sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def find_finished_run(root: str | Path, identity: str, first: str | Path | None = None
                      ) -> Path | None:
    """A complete run folder under ``root`` whose summary holds ``identity``, or None.

    ``first`` (the folder the job would write to) is checked before the others: in a restarted
    sweep each job finds its own folder at once. Hidden folders (``.hydra``, ``.submitit``) are
    not searched; a summary that cannot be read is not a match.
    """
    candidates = [Path(first)] if first is not None else []
    root = Path(root)
    if root.is_dir():
        candidates += list(_folders(root))
    for folder in candidates:
        if RunWriter.is_complete(folder) and _stored_identity(folder) == identity:
            return folder
    return None


def _prune(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _prune(v) for k, v in value.items() if k not in IGNORED_ANYWHERE}
    if isinstance(value, (list, tuple)):
        return [_prune(v) for v in value]
    return value


def _folders(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if SUMMARY_FILE in filenames:
            yield Path(dirpath)


def _stored_identity(folder: Path) -> str | None:
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return summary.get(HASH_KEY) if isinstance(summary, Mapping) else None
