"""Build-once, cache-forever for tiny backbones: keyed by everything the weights depend on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DONE_MARKER = "pretrain_report.json"


def cache_key(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cached_build(folder: Path, build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp)`` into a temporary sibling folder and rename it to ``folder``; the report
    it returns is written last, as the marker of a complete build. Reused when already there."""
    if (folder / DONE_MARKER).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        report = build(tmp)
        (tmp / DONE_MARKER).write_text(json.dumps(report, indent=1))
        if folder.exists():  # an incomplete leftover, or a finished concurrent build
            if (folder / DONE_MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return folder
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_report(folder: Path) -> dict:
    return json.loads((folder / DONE_MARKER).read_text())
