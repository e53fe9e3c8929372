"""The default tiny builds ship with the package (``mmke/backbones/tiny/shipped``): the files match
their manifest; every family's default settings, and its in-context stage, load them without
building; a damaged file, other settings and ``backbone.shipped=false`` behave as documented; the
resharding the shipped set is written with round-trips through ``from_pretrained``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from mmke.backbones.tiny import builder
from mmke.backbones.tiny.builder import DONE_MARKER, BuildingHere, cached_build, read_report
from mmke.backbones.tiny.compare import build_tensors, compare_builds
from mmke.backbones.tiny.shipping import (SETTINGS_FILE, SHIPPED, ShippedBuildError, find_shipped,
                                          read_manifest, reshard, ship, shipped_builds, verify,
                                          why_building)
from tests.backbones.families import build as build_random
from tests.conftest import ROOT, compose_config

FAMILIES = ["tiny_blip2", "tiny_llava", "tiny_minigpt4", "tiny_qwen2vl"]


def no_building(*args, **kwargs):
    raise AssertionError("a build started where a shipped one should have been copied")


@pytest.fixture()
def empty_cache(tmp_path, world_dir) -> Path:
    """A cache holding nothing but the default world (linked, not generated again)."""
    (tmp_path / "miniworld").mkdir()
    (tmp_path / "miniworld" / world_dir.name).symlink_to(world_dir, target_is_directory=True)
    return tmp_path


def test_the_shipped_files_match_the_manifest_and_stay_small():
    """If this fails, the shipped set was changed by hand: rewrite it with
    ``make rebuild-tiny ARGS=--ship`` (which also rewrites the manifest)."""
    builds = shipped_builds()
    for build in builds:
        verify(build)  # every file there, with its SHA-256, and nothing unlisted
    listed = {f"{b.family}/{b.key}/{rel}" for b in builds for rel in b.files}
    on_disk = {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*") if p.is_file()}
    assert on_disk - listed == {"manifest.json"}
    sizes = [p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()]
    assert max(sizes) < 2_000_000 and sum(sizes) < 48_000_000
    for text in SHIPPED.rglob("*.json"):
        content = text.read_text()
        assert str(ROOT) not in content and "/tmp/" not in content and "/home/" not in content, text


def test_every_family_ships_one_base_build_and_its_in_context_stage():
    builds = shipped_builds()
    for family in FAMILIES:
        keys = sorted(b.key for b in builds if b.family == family)
        bases = [k for k in keys if "-context-" not in k]
        assert len(bases) == 1 and keys == [bases[0], *[k for k in keys if k != bases[0]]]
        assert [k.split("-context-")[0] for k in keys if "-context-" in k] == bases
    machine = builds[0].built_on
    assert all(b.built_on == machine for b in builds)  # one machine built the whole set
    assert {"cpu", "avx512", "torch", "build_threads"} <= machine.keys()


@pytest.mark.parametrize("in_context", [False, True], ids=["base", "in_context"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_build_loads_from_the_shipped_set_without_building(family, in_context,
                                                                       empty_cache, monkeypatch):
    """If this fails, a recipe or a default setting changed without shipping its build: run
    ``make rebuild-tiny ARGS=--ship`` and choose the settings and bars on the new builds."""
    monkeypatch.setattr(builder, "build_threads", no_building)
    cfg = compose_config([f"backbone={family}", f"paths.cache_dir={empty_cache}",
                          f"backbone.in_context.enabled={str(in_context).lower()}"])
    backbone = instantiate(cfg.backbone)
    copied = sorted(p.parent for p in (empty_cache / "backbones").glob(f"*/*/{DONE_MARKER}"))
    assert any(p.parent.name == family and ("-context-" in p.name) == in_context for p in copied)
    loaded = {k: v for k, v in backbone.model.state_dict().items()}
    shipped_tensors = {}
    for folder in copied:
        shipped = find_shipped(folder, SHIPPED)
        assert shipped is not None and compare_builds(folder, shipped.folder).identical
        assert read_report(folder) == read_report(shipped.folder)
        shipped_tensors.update({k.split("/", 1)[-1]: v for k, v in
                                build_tensors(shipped.folder).items()})
    # the model holds the shipped weights: every stored tensor of its language model is loaded
    lm = [k for k in loaded if k.endswith("embed_tokens.weight")]
    assert lm and any(torch.equal(loaded[k], t) for k in lm for t in shipped_tensors.values()
                      if t.shape == loaded[k].shape)


def _fake_shipped(root: Path, family: str = "tiny_x", key: str = "k1",
                  settings: dict | None = None) -> Path:
    """A shipped set of one build, written by ``ship`` from a fake finished cache build."""
    build = root.parent / "cache" / "backbones" / family / key
    (build / "llm").mkdir(parents=True)
    save_file({"w": torch.arange(6.0)}, str(build / "llm" / "model.safetensors"))
    (build / SETTINGS_FILE).write_text(json.dumps(settings or {"model": {"width": 8}}))
    (build / DONE_MARKER).write_text(json.dumps({"vqa_orig": 0.5}))
    ship([build], root, machine={"cpu": "test", "avx512": []})
    return root


def test_a_shipped_build_is_copied_into_the_cache_checked_against_its_hashes(tmp_path):
    root = _fake_shipped(tmp_path / "shipped")
    folder = cached_build(tmp_path / "c" / "tiny_x" / "k1", no_building, {"model": {"width": 8}},
                          root)
    assert torch.equal(load_file(str(folder / "llm" / "model.safetensors"))["w"], torch.arange(6.0))
    assert read_report(folder) == {"vqa_orig": 0.5}
    manifest = read_manifest(root)
    assert manifest["builds"]["tiny_x/k1"]["built_on"] == {"cpu": "test", "avx512": []}


def test_a_damaged_shipped_file_stops_with_its_name_and_leaves_no_half_build(tmp_path):
    root = _fake_shipped(tmp_path / "shipped")
    weights = root / "tiny_x" / "k1" / "llm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ShippedBuildError, match=r"model\.safetensors: SHA-256 .*git checkout"):
        cached_build(tmp_path / "c" / "tiny_x" / "k1", no_building, {}, root)
    assert not (tmp_path / "c" / "tiny_x" / "k1").exists()
    weights.unlink()
    with pytest.raises(ShippedBuildError, match="missing from the shipped build"):
        verify(shipped_builds(root)[0])


def test_other_settings_build_here_and_say_what_differs(tmp_path):
    root = _fake_shipped(tmp_path / "shipped", settings={"model": {"width": 8}, "seed": 0})
    with pytest.warns(BuildingHere, match=r"differs in model\.width: 8 shipped, 16 here"):
        folder = cached_build(tmp_path / "c" / "tiny_x" / "k2", lambda out: {"built": 1},
                              {"model": {"width": 16}, "seed": 0}, root)
    assert read_report(folder) == {"built": 1}
    assert json.loads((folder / SETTINGS_FILE).read_text()) == {"model": {"width": 16}, "seed": 0}
    assert "ships no base build of tiny_y" in why_building(tmp_path / "tiny_y" / "k", {}, root)


def test_shipped_false_builds_here_even_where_a_build_ships(tmp_path):
    _fake_shipped(tmp_path / "shipped")
    assert builder.shipped_root(False) is None and builder.shipped_root(True) == SHIPPED
    with pytest.warns(BuildingHere, match="backbone.shipped=false"):
        folder = cached_build(tmp_path / "c" / "tiny_x" / "k1", lambda out: {"built": 2}, {}, None)
    assert read_report(folder) == {"built": 2}


def test_ship_refuses_an_unfinished_build_and_keeps_the_old_set(tmp_path):
    root = _fake_shipped(tmp_path / "shipped")
    half = tmp_path / "cache" / "backbones" / "tiny_x" / "half"
    half.mkdir(parents=True)
    (half / SETTINGS_FILE).write_text("{}")
    with pytest.raises(ShippedBuildError, match="unfinished"):
        ship([half], root, machine={})
    assert list(read_manifest(root)["builds"]) == ["tiny_x/k1"]


def test_resharded_weights_load_through_from_pretrained_unchanged(tmp_path):
    """A model saved whole, resharded below a limit: Hugging Face shards and index, every shard
    under it, and ``from_pretrained`` gives back the same tensors."""
    backbone = build_random("llava")
    model = backbone.model
    whole = tmp_path / "whole"
    model.save_pretrained(whole)
    limit = 200_000
    out = tmp_path / "sharded"
    shutil.copytree(whole, out, ignore=shutil.ignore_patterns("*.safetensors"))
    reshard(whole / "model.safetensors", out / "model.safetensors", limit)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all(p.stat().st_size < limit for p in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    again = type(model).from_pretrained(out)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert compare_builds(whole, out).identical
