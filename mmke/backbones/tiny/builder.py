"""Build-once, cache-forever for tiny backbones: keyed by everything the weights depend on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmke.results.atomic import build_folder_once

DONE_MARKER = "pretrain_report.json"


def cache_key(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cached_build(folder: Path, build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp)`` into a temporary sibling folder and rename it to ``folder``; the report
    it returns is written last, as the marker of a complete build. Reused when already there."""
    return build_folder_once(folder, lambda tmp: json.dumps(build(tmp), indent=1), DONE_MARKER)


def read_report(folder: Path) -> dict:
    return json.loads((folder / DONE_MARKER).read_text())
