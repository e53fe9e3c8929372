"""VLKEB: the released annotation files, port_new validation, the builder, portability prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmke.data.builders import vlkeb
from tests.data.test_mmedit_loader import good_row
from mmke.data.mmedit import load_mmedit
from mmke.data.prompts import (PORTABILITY_KIND, PromptTemplates, locality_set_prompts,
                               portability_prompts)
from mmke.errors import DataError


@pytest.fixture(scope="module")
def vlkeb_dir() -> Path:
    """The real VLKEB annotation files (text only), beside the project in ``shared/data``."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vlkeb"


row = good_row  # one valid MMEdit-schema record, fields overridable


def write(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "eval_edit_onehop.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("name,count", [("train.json", 5000), ("eval.json", 3174),
                                        ("eval_edit_onehop.json", 1278)])
def test_real_files_load(vlkeb_dir: Path, name: str, count: int) -> None:
    recs = load_mmedit(vlkeb_dir / name, vlkeb_dir / "VLKEB_images", "vqa")
    assert len(recs) == count
    has_port = [bool(portability_prompts(r, PromptTemplates())) for r in recs]
    assert all(has_port) if name == "eval_edit_onehop.json" else not any(has_port)


def test_builder_follows_the_released_layout(vlkeb_dir: Path) -> None:
    src = vlkeb(str(vlkeb_dir), "train.json", "eval_edit_onehop.json")
    rec = src.records("eval", limit=1)[0]
    assert rec.image.path == vlkeb_dir / "VLKEB_images" / "m.010bxh/bing_0.jpg"
    assert src.templates.edit == "{}" and src.templates.m_loc == "{}"  # VLKEB feeds questions as is
    split = vlkeb(None, "train.json", "eval.json", annotation_dir=str(vlkeb_dir),
                  image_root="/imgs")
    assert split.records("eval", limit=1)[0].image.path == Path("/imgs/m.010bnr/google_13.jpg")


def test_builder_without_root_names_the_settings() -> None:
    with pytest.raises(DataError, match="data.root is not set") as e:
        vlkeb(None, "train.json", "eval.json", annotation_dir="/a")
    assert "data.annotation_dir" in str(e.value) and "data.image_root" in str(e.value)


def test_real_onehop_record_portability(vlkeb_dir: Path) -> None:
    rec = load_mmedit(vlkeb_dir / "eval_edit_onehop.json", "/imgs", "vqa", limit=1)[0]
    [p] = portability_prompts(rec, PromptTemplates(edit="{}"))
    port = rec.extras["port_new"][0]
    assert p.text == port["port_q"] == "What is the time zone of the location shown in the picture?"
    assert p.target == port["port_a"] == "Central Time Zone"
    assert p.image == rec.image and p.kind == PORTABILITY_KIND
    assert port["port_edit_q"] not in p.text  # the second edit is not part of the port prompt


def test_hand_made_record_portability(tmp_path: Path) -> None:
    ports = [{"port_q": "Which river runs there?", "port_a": "Rhine"},
             {"port_edit_q": "Where is X?", "port_edit_a": "Y", "port_q": "Who rules it?",
              "port_a": "A king"}]
    rec = load_mmedit(write(tmp_path, [row(port_new=ports)]), tmp_path, "vqa")[0]
    prompts = portability_prompts(rec, PromptTemplates())
    assert [p.text for p in prompts] == ["Question: Which river runs there? Short answer:",
                                         "Question: Who rules it? Short answer:"]
    assert [p.target for p in prompts] == ["Rhine", "A king"]
    assert all(p.image == rec.image and p.kind == "port" for p in prompts)
    assert portability_prompts(load_mmedit(write(tmp_path, [row()]), tmp_path, "vqa")[0],
                               PromptTemplates()) == []


@pytest.mark.parametrize("port_new,field", [
    ("nope", "port_new"),
    ([["port_q"]], "port_new[0]"),
    ([{"port_a": "x"}], "port_new[0].port_q"),
    ([{"port_q": "q?", "port_a": "a"}, {"port_q": "q?", "port_a": " "}], "port_new[1].port_a"),
    ([{"port_q": 3, "port_a": "a"}], "port_new[0].port_q"),
    ([{"port_q": "q?", "port_a": "a", "port_edit_q": None}], "port_new[0].port_edit_q"),
])
def test_bad_port_new_names_file_record_and_field(tmp_path: Path, port_new: object,
                                                  field: str) -> None:
    path = write(tmp_path, [row(), row(port_new=port_new)])
    with pytest.raises(DataError) as e:
        load_mmedit(path, tmp_path, "vqa")
    assert (e.value.file, e.value.index, e.value.field) == (str(path), 1, field)
    assert e.value.hint and "port_q" in e.value.hint


def test_real_records_support_only_the_no_image_set(vlkeb_dir: Path) -> None:
    rec = load_mmedit(vlkeb_dir / "eval.json", "/imgs", "vqa", limit=1)[0]
    [p] = locality_set_prompts(rec, PromptTemplates(edit="{}"), "no_image")
    assert (p.text, p.target, p.image, p.kind) == (rec.src, rec.pred, None, "loc_no_image")
    for name, field in (("same_image", "loc_same_image_q"), ("similar_image", "loc_similar_image")):
        with pytest.raises(DataError) as e:
            locality_set_prompts(rec, PromptTemplates(), name)
        text = str(e.value)
        assert "eval:0" in text and f"'{name}'" in text and e.value.field == field
        assert e.value.hint and "no_image" in e.value.hint
