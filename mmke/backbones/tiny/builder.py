"""Build-once, cache-forever for tiny backbones: keyed by everything the weights depend on."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmke.results.atomic import build_folder_once

DONE_MARKER = "pretrain_report.json"

#: The default tiny builds, shipped with the package in the cache's own layout
#: (``shipped/<family>/<key>/``, as ``<cache_dir>/backbones/<family>/<key>/``). A float build
#: follows the CPU's kernels: the same code, world, seeds and packages gave tiny Qwen2-VL 93.1%
#: of the E-VQA-mini answers on one machine and 89.8% on another, and editor settings and test
#: bars chosen on one machine's builds failed on the other's. With the weights shipped, every
#: machine loads the same ones, and a fresh machine skips an hour of building. A build whose
#: settings or recipe differ has another key, finds nothing shipped and is built as before;
#: ``make rebuild-tiny ARGS=--ship`` (``benchmarks/rebuild_tiny.py``) rebuilds and re-ships them.
SHIPPED = Path(__file__).with_name("shipped")


def cache_key(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


#: torch threads every tiny build runs with. The order of float sums follows the thread count,
#: so builds with one thread and with two give different weights under the same cache key (and
#: editor settings chosen on one do not carry to the other). Two is what the 2-core CI machine
#: and ``make demo`` there use by default; pinning it makes every machine build those weights.
BUILD_THREADS = 2


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
    """Where a family looks for shipped builds: ``SHIPPED``, or nowhere with ``shipped=false``
    (the backbone setting that builds from scratch on this machine)."""
    return SHIPPED if use else None


def shipped_build(folder: Path, shipped: Path | None) -> Path | None:
    """The shipped copy of the cache folder ``folder`` (same family and key), if there is one."""
    if shipped is None:
        return None
    candidate = shipped / folder.parent.name / folder.name
    return candidate if (candidate / DONE_MARKER).is_file() else None


def cached_build(folder: Path, build: Callable[[Path], dict],
                 shipped: Path | None = None) -> Path:
    """Run ``build(tmp)`` into a temporary sibling folder and rename it to ``folder``; the report
    it returns is written last, as the marker of a complete build. Reused when already there;
    copied from ``shipped`` (a folder laid out as ``SHIPPED``) when a build of the same family
    and key is shipped there. The build runs with ``BUILD_THREADS`` torch threads, whatever the
    caller set."""
    source = shipped_build(folder, shipped)

    def run(tmp: Path) -> str:
        if source is not None:
            # copyfile, not copy2: an installed package's files may be read-only
            shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=shutil.copyfile)
            return (source / DONE_MARKER).read_text()
        with build_threads():
            return json.dumps(build(tmp), indent=1)

    return build_folder_once(folder, run, DONE_MARKER)


def read_report(folder: Path) -> dict:
    return json.loads((folder / DONE_MARKER).read_text())
