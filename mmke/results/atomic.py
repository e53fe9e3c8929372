"""Atomic file writes and JSON conversion for run folders.

A reader (``load_runs``, a notebook, another process polling a sweep) must never see a
half-written result. So every file is written to a temporary file in the *same* folder (a
rename is only atomic within one file system), flushed and fsynced, then moved over the target
with ``os.replace``: the target is either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or all of the new one."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see either the old file or all of the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The leading dot keeps the temporary file out of globs such as ``*.json``.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; results are meant to be read by collaborators too.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, paths and tuples to plain JSON-able Python values.

    Duck-typed (``.item()`` / ``.tolist()``) so that neither numpy nor torch must be imported
    here. Non-finite floats stay as they are: Python's json writes and reads back NaN/Infinity.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy scalar, 0-d array/tensor
        return to_jsonable(obj.item())
    if hasattr(obj, "tolist"):  # numpy array, torch tensor
        return to_jsonable(obj.tolist())
    raise TypeError(f"cannot store a value of type {type(obj).__name__} in JSON: {obj!r}")


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted names: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _key(key: Any) -> str:
    """JSON keys must be strings; numpy ints etc. are converted through their Python value."""
    key = to_jsonable(key)
    return key if isinstance(key, str) else json.dumps(key)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` (after ``to_jsonable``) as JSON with a trailing newline."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False) + "\n")


def build_folder_once(folder: Path, fill: Callable[[Path], str], marker: str) -> Path:
    """``folder``, built the first time: ``fill(tmp)`` fills a temporary sibling folder and
    returns the text of ``marker``, written last as the sign of a complete build; the sibling is
    then renamed to ``folder``. A crash leaves no folder; an unmarked leftover is replaced; a
    concurrent build that finished first wins."""
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        (tmp / marker).write_text(fill(tmp))
        if folder.exists():
            if (folder / marker).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return folder
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
