"""The MMEdit/VLKEB loader, its validation errors, and MMEditSource over the real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmke.data.mmedit import IMAGE_FIELDS, REQUIRED_FIELDS, check_images, load_mmedit
from mmke.data.prompts import VQA_TEMPLATE, edit_prompts
from mmke.data.record import LazyImage
from mmke.data.source import MMEditSource
from mmke.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """The project root's sibling ``shared/data`` (always present in CI, so nothing skips)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def vqa_source(root: Path, image_root: Path | str = "/nonexistent/images") -> MMEditSource:
    return MMEditSource(task="vqa", annotation_dir=str(root / "mmedit"), image_root=str(image_root),
                        train_file="vqa_train.json", eval_file="vqa_eval.json",
                        edit_template=VQA_TEMPLATE)


def caption_source(root: Path) -> MMEditSource:
    return MMEditSource(task="caption", annotation_dir=str(root / "mmedit"),
                        image_root="/nonexistent/images", train_file="caption_train_edit.json",
                        eval_file="caption_eval_edit.json", edit_template="{}")


def good_row(**over: object) -> dict[str, object]:
    row: dict[str, object] = {f: f"{f} text" for f in REQUIRED_FIELDS}
    row.update({f: f"imgs/{f}.png" for f in IMAGE_FIELDS})
    row.update(over)
    return row


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


# --- real files ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,task,count", [
    ("vqa_train.json", "vqa", 6345), ("vqa_eval.json", "vqa", 2093),
    ("caption_train_edit.json", "caption", 2849), ("caption_eval_edit.json", "caption", 1000),
])
def test_real_mmedit_files_load(shared_data: Path, name: str, task: str, count: int) -> None:
    recs = load_mmedit(shared_data / "mmedit" / name, "/imgs", task)  # type: ignore[arg-type]
    assert len(recs) == count
    assert all(r.task == task for r in recs)
    assert recs[-1].uid == f"{Path(name).stem}:{count - 1}"


def test_first_record_matches_json(shared_data: Path) -> None:
    path = shared_data / "mmedit" / "vqa_train.json"
    raw = json.loads(path.read_text())[0]
    rec = load_mmedit(path, "/imgs", "vqa", limit=1)[0]
    for f in REQUIRED_FIELDS:
        got = getattr(rec, f)
        assert (got.path == Path("/imgs") / raw[f]) if f in IMAGE_FIELDS else got == raw[f]
    assert rec.uid == "vqa_train:0" and rec.extras == {}
    assert rec.image.source == f"file {path}, record 0, field 'image'"


def test_limit_takes_first_n(shared_data: Path) -> None:
    recs = load_mmedit(shared_data / "mmedit" / "vqa_eval.json", "/imgs", "vqa", limit=3)
    assert [r.uid for r in recs] == ["vqa_eval:0", "vqa_eval:1", "vqa_eval:2"]


def test_vlkeb_files_load(shared_data: Path) -> None:
    counts = {name: len(load_mmedit(shared_data / "vlkeb" / name, "/imgs", "vqa"))
              for name in ("train.json", "eval.json", "eval_edit_onehop.json")}
    assert counts == {"train.json": 5000, "eval.json": 3174, "eval_edit_onehop.json": 1278}
    onehop = load_mmedit(shared_data / "vlkeb" / "eval_edit_onehop.json", "/imgs", "vqa", limit=1)
    port = onehop[0].extras["port_new"]
    assert isinstance(port, list) and "port_q" in port[0]


def test_vqa_prompts(shared_data: Path) -> None:
    src = vqa_source(shared_data)
    prompts = edit_prompts(src.records("train", limit=1)[0], src.templates)
    assert prompts[0].text == "Question: How many skyscrapers are there? Short answer:"
    assert [p.kind for p in prompts] == ["rel", "t_gen", "m_gen", "t_loc", "m_loc"]


def test_caption_prompt(shared_data: Path) -> None:
    src = caption_source(shared_data)
    rec = src.records("train", limit=1)[0]
    assert src.task == "caption" and rec.task == "caption"
    assert edit_prompts(rec, src.templates)[0].text == "a photo of"


def test_source_caches_and_checks(shared_data: Path) -> None:
    src = vqa_source(shared_data)
    full = src.records("eval")
    assert len(full) == 2093 and src.name == "mmedit_vqa"
    assert src.records("eval", limit=5) == full[:5]
    assert src._cache["eval"][0] is None  # a smaller limit reuses the full load
    with pytest.raises(ValueError, match="split"):
        src.records("test")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs,match", [
    ({"task": "vqa2"}, "data.task"),
    ({"edit_template": "Question: Short answer:"}, "edit_template"),
    ({"edit_template": "{} and {}"}, "edit_template"),
    ({"m_loc_template": "Q: {name}"}, "m_loc_template"),
])
def test_source_rejects_bad_config(kwargs: dict[str, str], match: str) -> None:
    base = dict(task="vqa", annotation_dir="a", image_root="i", train_file="t.json",
                eval_file="e.json", edit_template=VQA_TEMPLATE)
    with pytest.raises(ConfigError, match=match):
        MMEditSource(**{**base, **kwargs})


# --- error cases --------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_mmedit(tmp_path / "nope.json", tmp_path, "vqa")
    assert "nope.json" in str(e.value) and "data.annotation_dir" in str(e.value)


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good_row()], indent=1)[:-40])  # truncated mid-record
    with pytest.raises(DataError, match=r"not valid JSON: .* at line \d+, column \d+") as e:
        load_mmedit(path, tmp_path, "vqa")
    assert e.value.file == str(path)


def test_top_level_dict(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", {"data": [good_row()]})
    with pytest.raises(DataError, match="expected a JSON list .* got dict") as e:
        load_mmedit(path, tmp_path, "vqa")
    assert str(path) in str(e.value)


def test_record_not_object(tmp_path: Path) -> None:
    path = write_json(tmp_path / "r.json", [good_row(), ["x"]])
    with pytest.raises(DataError, match="record 1: expected a JSON object, got list"):
        load_mmedit(path, tmp_path, "vqa")


@pytest.mark.parametrize("row,field,message", [
    ({k: v for k, v in good_row().items() if k != "alt"}, "alt", "required field missing"),
    (good_row(rephrase="  "), "rephrase", "empty or whitespace-only"),
    (good_row(loc_ans=3), "loc_ans", "expected a string, got int"),
])
def test_bad_record_names_file_record_field(tmp_path: Path, row: dict, field: str,
                                            message: str) -> None:
    path = write_json(tmp_path / "x.json", [good_row(), good_row(), row])
    with pytest.raises(DataError) as e:
        load_mmedit(path, tmp_path, "vqa")
    assert str(e.value).startswith(f"file {path}, record 2, field '{field}': {message}")
    assert (e.value.file, e.value.index, e.value.field) == (str(path), 2, field)
    assert e.value.hint
    # ``limit`` validates only the rows it keeps.
    assert len(load_mmedit(path, tmp_path, "vqa", limit=2)) == 2


# --- images -------------------------------------------------------------------------------

def test_check_images(tmp_path: Path) -> None:
    rows = [good_row(image=f"imgs/{i}.png", image_rephrase=f"imgs/{i}r.png") for i in range(3)]
    recs = load_mmedit(write_json(tmp_path / "x.json", rows), tmp_path / "root", "vqa")
    with pytest.raises(DataError) as e:
        check_images(recs)
    msg = str(e.value)
    # 3 images + 3 rephrases + 1 m_loc shared by all rows.
    assert "7 image file(s) missing" in msg and "first 5" in msg and "and 2 more" in msg
    assert "x:0 field 'image'" in msg and "data.root" in msg
    for rec in recs:
        for f in IMAGE_FIELDS:
            p = getattr(rec, f).path
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (2, 2), "red").save(p, format="PNG")
    check_images(recs)
    assert recs[0].image.load().size == (2, 2)


def test_lazy_image_missing(tmp_path: Path) -> None:
    img = LazyImage(tmp_path / "gone.jpg", source="file f, record 0, field 'image'")
    with pytest.raises(DataError, match="image not found") as e:
        img.load()
    assert "record 0" in str(e.value)
