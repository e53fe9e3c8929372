"""Build-once, cache-forever for tiny backbones: keyed by everything the weights depend on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmke.results.atomic import build_folder_once

DONE_MARKER = "pretrain_report.json"


def cache_key(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


#: torch threads every tiny build runs with. The order of float sums follows the thread count,
#: so builds with one thread and with two give different weights under the same cache key (and
#: editor settings chosen on one do not carry to the other). Two is what the 2-core CI machine
#: and ``make demo`` there use by default; pinning it makes every machine build those weights.
BUILD_THREADS = 2
# A float build also follows the CPU's kernels: the same code, world, seeds, threads and packages
# gave tiny Qwen2-VL 93.1% of the E-VQA-mini answers on one machine (AVX-512) and 89.8% on another
# (a 2-core AMD EPYC without AVX-512, the CI machine's kind, on whose builds the editor settings
# and test bars are chosen). `make rebuild-tiny` (benchmarks/rebuild_tiny.py) tells how far this
# machine's rebuild lands from the builds in a cache.


@contextmanager
def build_threads(n: int = BUILD_THREADS) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cached_build(folder: Path, build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp)`` into a temporary sibling folder and rename it to ``folder``; the report
    it returns is written last, as the marker of a complete build. Reused when already there.
    The build runs with ``BUILD_THREADS`` torch threads, whatever the caller set."""

    def run(tmp: Path) -> str:
        with build_threads():
            return json.dumps(build(tmp), indent=1)

    return build_folder_once(folder, run, DONE_MARKER)


def read_report(folder: Path) -> dict:
    return json.loads((folder / DONE_MARKER).read_text())
