"""Every config group composes, and every option instantiates (or says clearly what is missing)."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mmke.backbones.base import Backbone
from mmke.config import build as instantiate
from mmke.errors import DataError, MMKEError, WeightsNotFoundError
from tests.conftest import CONF, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_are_the_documented_ones():
    assert {"backbone", "data", "editor", "reg", "protocol", "eval", "logger", "paths",
            "debug"} <= set(GROUPS)


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    if group == "editor_backbone":  # chosen by the editor and backbone, not on its own
        pairs = [(e, b) for e in options("editor") for b in options("backbone")
                 if f"{e}_{b}" == option]
        assert pairs, f"editor_backbone/{option}.yaml matches no editor_backbone pair"
        editor, backbone = pairs[0]
        cfg = compose_config([f"editor={editor}", f"backbone={backbone}"])
        # the editor's own file, not the editor composed with the default backbone, which may
        # have a pair file of its own (grace_tiny_blip2)
        alone = OmegaConf.load(CONF / "editor" / f"{editor}.yaml")
        assert cfg.editor != alone  # the pair's settings arrived
        return
    cfg = compose_config([f"{group}={option}"])
    # debug presets and searches are global overrides (@package _global_), not a node of their own
    if group not in ("debug", "hparams_search"):
        assert cfg[group] is not None


@pytest.mark.parametrize("group", ["editor", "reg", "protocol", "eval", "logger"])
def test_every_light_option_instantiates(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        if "mmke.planned.planned" in (CONF / group / f"{option}.yaml").read_text():
            # a method the papers need but mmke has not built yet: it must say so, by name
            with pytest.raises(MMKEError, match=f"{group}={option}"):
                instantiate(cfg[group])
            continue
        obj = instantiate(cfg[group])
        assert obj is not None
        if group in ("editor", "reg", "protocol"):
            assert obj.name == cfg[group].name


def test_mini_data_sources_instantiate():
    for option in ("mini_vqa", "mini_caption"):
        source = instantiate(compose_config([f"data={option}"]).data)
        assert len(source.records("eval", limit=3)) == 3


def test_real_mmedit_needs_a_root():
    with pytest.raises(DataError, match="data.root is not set"):
        instantiate(compose_config(["data=mmedit_vqa"]).data)


def test_real_mmedit_loads_the_shared_annotations(shared_data: Path):
    cfg = compose_config(["data=mmedit_caption", f"data.annotation_dir={shared_data / 'mmedit'}",
                          "data.image_root=/nowhere"])
    assert len(instantiate(cfg.data).records("eval")) == 1000


def test_tiny_backbone_instantiates(pretrained):
    assert isinstance(pretrained, Backbone)


@pytest.mark.parametrize("family, setting", [("blip2", "backbone.path"), ("llava", "backbone.path"),
                                             ("qwen2vl", "backbone.path"),
                                             ("minigpt4", "backbone.projection_path")])
def test_real_backbone_without_weights_names_the_setting(family, setting):
    with pytest.raises(WeightsNotFoundError, match=setting):
        instantiate(compose_config([f"backbone={family}"]).backbone)


def test_minigpt4_names_each_missing_source(tmp_path):
    ckpt = tmp_path / "minigpt4.pth"
    ckpt.write_bytes(b"")
    cfg = compose_config(["backbone=minigpt4", f"backbone.projection_path={ckpt}"])
    with pytest.raises(WeightsNotFoundError, match="backbone.blip2_path"):
        instantiate(cfg.backbone)


def test_unknown_option_is_a_composition_error():
    with pytest.raises(ConfigCompositionException):
        compose_config(["editor=no_such_editor"])
