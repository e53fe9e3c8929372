"""Every family's real build recipe, end to end on a small world with few steps (the full builds
of the families other than the tiny BLIP-2 are tested under the ``families`` marker), and the
build comparison of ``benchmarks/rebuild_tiny.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from mmke.backbones.tiny.builder import DONE_MARKER, BuildingHere, read_report
from mmke.backbones.tiny.compare import compare_builds
from tests.conftest import SHORT_BUILD, SMALL_WORLD, compose_config

@pytest.mark.parametrize("family", list(SHORT_BUILD))
def test_the_recipe_builds_from_scratch(family, small_world):
    """The real recipe, every stage, on the small world with a few steps: a loadable build and
    its report (the default builds are this with the default settings)."""
    cache = small_world.parents[1]
    cfg = compose_config([f"backbone={family}", f"paths.cache_dir={cache}",
                          *[f"world.{k}={v}" for k, v in SMALL_WORLD.items()],
                          *SHORT_BUILD[family]])
    with pytest.warns(BuildingHere, match="no shipped build answers to these settings"):
        backbone = instantiate(cfg.backbone)
    builds = [p.parent for p in (cache / "backbones" / family).glob(f"*/{DONE_MARKER}")]
    assert len(builds) == 1
    report = read_report(builds[0])
    assert report["parameters"] == sum(p.numel() for p in backbone.model.parameters())
    assert {"final_loss", "vqa_orig", "caption_orig", "vqa_heldout_orig_rephrase"} <= report.keys()


def write_build(folder: Path, tensors: dict[str, torch.Tensor], report: dict | None = None) -> Path:
    (folder / "llm").mkdir(parents=True)
    save_file(tensors, str(folder / "llm" / "model.safetensors"))
    if report is not None:
        (folder / DONE_MARKER).write_text(json.dumps(report))
    return folder


def test_compare_builds_counts_differing_tensors_and_the_largest_difference(tmp_path):
    w = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    same = write_build(tmp_path / "same", {k: v.clone() for k, v in w.items()})
    base = write_build(tmp_path / "base", w)
    moved = write_build(tmp_path / "moved", {"a": torch.tensor([0.0, -0.25, 0.0]), "b": w["b"]})
    assert compare_builds(base, same).identical
    diff = compare_builds(base, moved)
    assert (diff.tensors, diff.differing, diff.max_abs) == (2, 1, 0.25)
    with pytest.raises(ValueError, match="different tensors"):
        compare_builds(base, write_build(tmp_path / "other", {"a": w["a"]}))
    # MiniGPT-4's projection: a torch file with the released checkpoint's nesting
    torch.save({"model": {"llama_proj.bias": torch.zeros(2)}}, same / "proj.pth")
    torch.save({"model": {"llama_proj.bias": torch.tensor([0.0, 2.0])}}, base / "proj.pth")
    diff = compare_builds(base, same)
    assert (diff.tensors, diff.differing, diff.max_abs) == (3, 1, 2.0)
