"""The default tiny builds ship with the package (``mmke/backbones/tiny/shipped``): every family's
default settings find theirs and load it without building; other settings, or
``backbone.shipped=false``, build with the real recipe, which runs here end to end on a small
world with few steps; the comparison and shipping helpers of ``benchmarks/rebuild_tiny.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from mmke.backbones.tiny.builder import DONE_MARKER, cached_build, read_report
from mmke.backbones.tiny.shipping import compare_builds, ship_build
from tests.conftest import SMALL_WORLD, compose_config

FAMILIES = ["tiny_blip2", "tiny_llava", "tiny_minigpt4", "tiny_qwen2vl"]


def no_building(*args, **kwargs):
    raise AssertionError("a build started where a shipped one should have been copied")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_recipe_builds_from_scratch_with_shipped_off(family, small_world):
    """The real recipe, every stage, on the small world with a few steps: a loadable build and
    its report (the shipped builds are this with the default settings)."""
    cache = small_world.parents[1]
    short = ["backbone.stage1.steps=10", "backbone.pretraining.epochs=1"]
    if family == "tiny_minigpt4":
        short = ["backbone.blip2.stage1.steps=10", "backbone.blip2.pretraining.epochs=1",
                 "backbone.pretraining.epochs=1"]
    cfg = compose_config([f"backbone={family}", f"paths.cache_dir={cache}",
                          "backbone.shipped=false", *[f"world.{k}={v}" for k, v in SMALL_WORLD.items()],
                          *short])
    backbone = instantiate(cfg.backbone)
    builds = [p.parent for p in (cache / "backbones" / family).glob(f"*/{DONE_MARKER}")]
    assert len(builds) == 1
    report = read_report(builds[0])
    assert report["parameters"] == sum(p.numel() for p in backbone.model.parameters())
    assert {"final_loss", "vqa_orig", "caption_orig", "vqa_heldout_orig_rephrase"} <= report.keys()


def test_a_shipped_build_is_copied_and_shipped_off_builds(tmp_path):
    shipped = tmp_path / "shipped"
    (shipped / "tiny_x" / "k1" / "sub").mkdir(parents=True)
    (shipped / "tiny_x" / "k1" / "sub" / "w.bin").write_bytes(b"weights")
    (shipped / "tiny_x" / "k1" / DONE_MARKER).write_text(json.dumps({"vqa_orig": 0.5}))
    folder = cached_build(tmp_path / "cache" / "tiny_x" / "k1", no_building, shipped)
    assert (folder / "sub" / "w.bin").read_bytes() == b"weights"
    assert read_report(folder) == {"vqa_orig": 0.5}
    other = cached_build(tmp_path / "cache" / "tiny_x" / "k2", lambda out: {"built": 1}, shipped)
    assert read_report(other) == {"built": 1}  # another key: nothing shipped, built
    off = cached_build(tmp_path / "off" / "tiny_x" / "k1", lambda out: {"built": 2}, None)
    assert read_report(off) == {"built": 2}


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


def test_ship_build_keeps_one_key_per_family_and_refuses_an_unfinished_build(tmp_path):
    shipped = tmp_path / "shipped"
    old = write_build(shipped / "tiny_x" / "old", {"a": torch.zeros(1)}, {"v": 0})
    new = write_build(tmp_path / "cache" / "tiny_x" / "new", {"a": torch.ones(1)}, {"v": 1})
    target = ship_build(new, shipped)
    assert target == shipped / "tiny_x" / "new" and not old.exists()
    assert compare_builds(target, new).identical and read_report(target) == {"v": 1}
    unfinished = write_build(tmp_path / "cache" / "tiny_x" / "half", {"a": torch.ones(1)})
    with pytest.raises(FileNotFoundError):
        ship_build(unfinished, shipped)
