"""The mini world generator: deterministic, MMEdit schema, loadable, coherent answers."""

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from mmke.data.miniworld.generate import ANNOTATION_FILES, PROBE_CATEGORIES, MiniWorldSpec, ensure_miniworld
from mmke.data.mmedit import REQUIRED_FIELDS, check_images, load_mmedit

SMALL = MiniWorldSpec(seed=3, train_scenes=12, eval_scenes=6, loc_scenes=4, fact_subjects=5,
                      probes_per_category=3)


def test_same_seed_same_world(tmp_path: Path):
    a = ensure_miniworld(tmp_path / "a", SMALL)
    b = ensure_miniworld(tmp_path / "b", SMALL)
    for name in ANNOTATION_FILES.values():
        assert (a / name).read_text() == (b / name).read_text()
    assert (a / "images/eval/s00003.png").read_bytes() == (b / "images/eval/s00003.png").read_bytes()


def test_other_seed_other_world(tmp_path: Path):
    a = ensure_miniworld(tmp_path, SMALL)
    b = ensure_miniworld(tmp_path, MiniWorldSpec(**{**SMALL.__dict__, "seed": 4}))
    assert a != b
    assert (a / "vqa_eval.json").read_text() != (b / "vqa_eval.json").read_text()


def test_schema_splits_and_images(tmp_path: Path):
    root = ensure_miniworld(tmp_path, SMALL)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["vqa_train.json"] == 12 * SMALL.questions_per_scene
    assert manifest["counts"]["caption_eval_edit.json"] == 6
    for (task, _), name in ANNOTATION_FILES.items():
        rows = json.loads((root / name).read_text())
        assert all(set(REQUIRED_FIELDS) <= row.keys() for row in rows)
        records = load_mmedit(root / name, root, task)
        check_images(records)
        for r in records:
            assert r.alt != r.pred and r.rephrase != r.src
            assert r.image.path != r.image_rephrase.path
    with Image.open(root / "images/train/s00000.png") as img:
        assert img.size == (SMALL.image_size, SMALL.image_size)


def test_image_rephrase_is_the_same_scene_drawn_differently(tmp_path: Path):
    root = ensure_miniworld(tmp_path, SMALL)
    a = Image.open(root / "images/eval/s00000.png").tobytes()
    b = Image.open(root / "images/eval/s00000_r.png").tobytes()
    assert a != b


def test_probe_sets(tmp_path: Path):
    root = ensure_miniworld(tmp_path, SMALL)
    for category in PROBE_CATEGORIES:
        rows = json.loads((root / "probes" / f"{category}.json").read_text())
        assert len(rows) == 3 and all(r["category"] == category for r in rows)
        assert all((root / r["image"]).is_file() for r in rows)


def test_vqa_answers_match_the_scene_text(tmp_path: Path):
    """Count answers agree with caption object counts for the same scene (same image file)."""
    root = ensure_miniworld(tmp_path, SMALL)
    captions = {r["image"]: r["pred"] for r in json.loads((root / "caption_train_edit.json").read_text())}
    words = {"one": 1, "two": 2, "three": 3}
    for r in json.loads((root / "vqa_train.json").read_text()):
        if r["src"] == "How many objects are there?":
            n = captions[r["image"]].count(",") + captions[r["image"]].count(" and ") + 1
            assert words[r["pred"]] == n


def test_interrupted_build_leaves_no_world(tmp_path: Path, monkeypatch):
    import mmke.data.miniworld.generate as gen

    def boom(out, spec):
        (out / "half.json").write_text("{")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gen, "write_world", boom)
    try:
        gen.ensure_miniworld(tmp_path, SMALL)
    except RuntimeError:
        pass
    assert not (tmp_path / "miniworld" / SMALL.key()).exists()
    assert list((tmp_path / "miniworld").iterdir()) == []


# --- version 5 adds fields, never changes old ones ------------------------------------------

LEGACY_KEYS = REQUIRED_FIELDS + ("kind",)
# legacy_digest of worlds written by GENERATOR_VERSION 4 (before port_new and the loc_* fields):
# the tiny backbones are pretrained on these fields, pictures, scenes and facts.
VERSION_4_DIGESTS = [
    (SMALL, "e99f8c230c5fdd9c76833843643ce5b2efc901aa0309cabbe2cc300e70c9c93c"),
    (MiniWorldSpec(seed=11, train_scenes=30, eval_scenes=20, loc_scenes=6, fact_subjects=5,
                   probes_per_category=2),
     "8e3d0f1c0a91a61bf86970dbcc3678b7cec63a4047a4713ca58afc654aa29b0e"),
]


def legacy_digest(root: Path) -> str:
    """SHA-256 over everything version 4 wrote: the old fields of every record, scenes.json,
    facts.json, the probe sets, and the pixels of every picture they name."""
    h = hashlib.sha256()

    def add(obj: object) -> None:
        h.update(json.dumps(obj, sort_keys=True).encode())

    for name in sorted(ANNOTATION_FILES.values()):
        rows = json.loads((root / name).read_text())
        add([{k: r[k] for k in LEGACY_KEYS if k in r} for r in rows])
    scenes = json.loads((root / "scenes.json").read_text())
    add({s: scenes[s] for s in ("train", "eval")})
    add(json.loads((root / "facts.json").read_text()))
    pictures = [p for s in ("train", "eval") for p in scenes[s]]
    for category in PROBE_CATEGORIES:
        rows = json.loads((root / "probes" / f"{category}.json").read_text())
        add(rows)
        pictures += [r["image"] for r in rows]
    for p in sorted(set(pictures)):
        with Image.open(root / p) as img:
            h.update(p.encode())
            h.update(img.convert("RGB").tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("spec,digest", VERSION_4_DIGESTS)
def test_new_fields_leave_version_4_untouched(tmp_path: Path, spec: MiniWorldSpec, digest: str):
    root = ensure_miniworld(tmp_path, spec)
    assert legacy_digest(root) == digest
    assert set(json.loads((root / "scenes.json").read_text())) == {"train", "eval"}
