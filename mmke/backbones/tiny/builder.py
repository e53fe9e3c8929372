"""Build-once, cache-forever for tiny backbones: keyed by everything the weights depend on."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmke.backbones.tiny.shipping import (REPORT_FILE, SETTINGS_FILE, SHIPPED, copy_shipped,
                                          find_shipped, why_building)
from mmke.results.atomic import atomic_write_text, build_folder_once

DONE_MARKER = REPORT_FILE


class BuildingHere(UserWarning):
    """A tiny build is trained on this machine (nothing shipped answers to its settings, or
    ``backbone.shipped=false``): the message says why."""


def cache_key(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_folder(cache_dir: str, family: str, recipe: int, world: Any,
                 parts: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """A family's build folder ``<cache>/backbones/<family>/<key>`` and the settings it answers
    to, both from the same parts: the key hashes the recipe version, the world's key and
    ``parts``' values in order; the settings name them, with the world's own settings
    (``MiniWorldSpec``), so ``why_building`` can say which one differs."""
    key = cache_key(recipe, world.key(), *parts.values())
    settings = {"recipe": recipe, "world": world.settings(), **parts}
    return Path(cache_dir) / "backbones" / family / key, settings


#: torch threads every tiny build runs with. The order of float sums follows the thread count,
#: so builds with one thread and with two give different weights under the same cache key (and
#: editor settings chosen on one do not carry to the other). Two is what the 2-core CI machine
#: and ``make demo`` there use by default; pinning it makes every machine build those weights.
BUILD_THREADS = 2
# A float build also follows the CPU's kernels, so the default builds ship with the package
# (mmke.backbones.tiny.shipping); `make rebuild-tiny` tells how far this machine's rebuild lands.


@contextmanager
def build_threads(n: int = BUILD_THREADS) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shipped_root(use: bool) -> Path | None:
    """Where a family looks for shipped builds: ``SHIPPED``, or nowhere with
    ``backbone.shipped=false`` (build on this machine)."""
    return SHIPPED if use else None


def cached_build(folder: Path, build: Callable[[Path], dict], settings: dict[str, Any],
                 shipped: Path | None = None) -> Path:
    """``folder`` (``<cache>/backbones/<family>/<key>``), made the first time: copied from the
    shipped set ``shipped`` when a build of that family and key ships there, else ``build(tmp)``
    fills a temporary sibling folder with ``BUILD_THREADS`` torch threads and its report is
    written last, as the marker of a complete build. ``settings``, the named parts of the key,
    are kept beside the report (``SETTINGS_FILE``): they say what a later build differs in."""
    text = json.dumps(settings, indent=1, sort_keys=True, default=str)
    if (folder / DONE_MARKER).is_file():
        if not (folder / SETTINGS_FILE).is_file():  # a build made before settings were kept
            atomic_write_text(folder / SETTINGS_FILE, text)
        return folder
    source = find_shipped(folder, shipped)

    def run(tmp: Path) -> str:
        if source is not None:
            return copy_shipped(source, tmp)
        warnings.warn(why_building(folder, settings, shipped), BuildingHere, stacklevel=4)
        (tmp / SETTINGS_FILE).write_text(text)
        with build_threads():
            return json.dumps(build(tmp), indent=1)

    return build_folder_once(folder, run, DONE_MARKER)


def read_report(folder: Path) -> dict:
    return json.loads((folder / DONE_MARKER).read_text())
