"""Tiny builds run with a pinned thread count: one thread and two give different weights under
the same cache key, so every machine must build with the same count."""

import pytest
import torch

from mmke.backbones.tiny.builder import BUILD_THREADS, cached_build


@pytest.mark.filterwarnings("ignore::mmke.backbones.tiny.builder.BuildingHere")
def test_a_build_runs_with_the_pinned_threads_and_restores_the_callers(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    seen = []
    try:
        cached_build(tmp_path / "model", lambda out: seen.append(torch.get_num_threads()) or {},
                     {"v": 1})
        assert seen == [BUILD_THREADS]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
