"""The mini world's one-hop portability and DE-VQA locality sets, checked against scenes.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmke.data.miniworld.generate import (ANNOTATION_FILES, SIMILAR_SCENES_FILE, MiniWorldSpec,
                                          ensure_miniworld)
from mmke.data.miniworld.questions import all_questions, answer, caption
from mmke.data.miniworld.scene import Scene, SceneObject
from mmke.data.miniworld.vocab import COLOURS, SHAPES
from mmke.data.mmedit import check_images, load_mmedit
from mmke.data.prompts import (CAPTION_TEMPLATE, LOCALITY_SETS, VQA_TEMPLATE, PromptTemplates,
                               locality_set_prompts, portability_prompts)
from mmke.data.record import EditRecord
from mmke.errors import ConfigError, DataError

SPEC = MiniWorldSpec(seed=5, train_scenes=30, eval_scenes=30, loc_scenes=4, fact_subjects=5,
                     probes_per_category=1)
VQA = PromptTemplates()
CAP = PromptTemplates(edit=CAPTION_TEMPLATE)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_miniworld(tmp_path_factory.mktemp("w"), SPEC)


def scenes(world: Path) -> dict[str, Scene]:
    """Every picture of the world (edit, locality and similar-image ones), by path."""
    shown = {}
    for name in ("scenes.json", SIMILAR_SCENES_FILE):
        for split in json.loads((world / name).read_text()).values():
            shown.update(split)
    return {p: Scene(tuple(SceneObject(**o) for o in objs)) for p, objs in shown.items()}


def rel(world: Path, rec_path: Path) -> str:
    return str(rec_path.relative_to(world))


def named(text: str, vocab) -> str:
    """The one vocabulary word a question names."""
    [word] = [w for w in text.rstrip("?").split() if w in vocab]
    return word


def records(world: Path, task: str) -> list[EditRecord]:
    return [r for split in ("train", "eval")
            for r in load_mmedit(world / ANNOTATION_FILES[(task, split)], world, task)]


def test_port_answers_follow_from_the_edit(world: Path) -> None:
    shown, kinds = scenes(world), set()
    for rec in records(world, "vqa"):
        scene, kind = shown[rel(world, rec.image.path)], rec.extras["kind"]
        prompts = portability_prompts(rec, VQA)
        if kind == "colour":  # "What colour is the square?" -> alt  =>  the alt object is a square
            obj = scene.by_shape(named(rec.src, SHAPES))
            ambiguous = scene.by_colour(rec.alt) is not None
            expected = (f"What shape is the {rec.alt} object?", obj.shape)
        elif kind == "shape":  # "What shape is the red object?" -> alt  =>  the alt is red
            obj = scene.by_colour(named(rec.src, COLOURS))
            ambiguous = scene.by_shape(rec.alt) is not None
            expected = (f"What colour is the {rec.alt}?", obj.colour)
        else:
            assert prompts == []
            continue
        if ambiguous:
            assert prompts == []
            continue
        [p] = prompts
        kinds.add(kind)
        assert (p.text, p.target) == (VQA_TEMPLATE.format(expected[0]), expected[1])
        assert p.image == rec.image and p.kind == "port"
        assert p.target == named(rec.src, (*SHAPES, *COLOURS))  # the edited object, as named
    assert kinds == {"colour", "shape"}


def true_question(scene: Scene, text: str):
    [q] = [q for q in all_questions(scene) if q.texts[0] == text]
    return q


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_locality_sets_hold_what_their_names_say(world: Path, task: str) -> None:
    shown, templates = scenes(world), VQA if task == "vqa" else CAP
    recs = records(world, task)
    check_images(recs)  # the similar-image pictures too
    for rec in recs:
        scene = shown[rel(world, rec.image.path)]
        [same] = locality_set_prompts(rec, templates, "same_image")
        [similar] = locality_set_prompts(rec, templates, "similar_image")
        [blind] = locality_set_prompts(rec, templates, "no_image")
        assert (same.kind, similar.kind, blind.kind) == ("loc_same_image", "loc_similar_image",
                                                         "loc_no_image")
        # same_image: the edit's picture, another question, its true answer there
        assert same.image == rec.image
        q = true_question(scene, rec.extras["loc_same_image_q"])
        assert same.text == VQA_TEMPLATE.format(q.texts[0]) and same.target == q.answer
        # similar_image: the edit question on another picture that holds the named object
        other = shown[rel(world, similar.image.path)]
        assert similar.image.path != rec.image.path and other.objects != scene.objects
        assert similar.text == templates.edit.format(rec.src)
        # no_image: the edit question without a picture, the unedited answer as target
        assert (blind.text, blind.target, blind.image) == (templates.edit.format(rec.src),
                                                           rec.pred, None)
        if task == "vqa":
            kind = rec.extras["kind"]
            assert q.kind != kind and rec.alt not in q.mentions() and rec.pred not in q.mentions()
            slots = {k: named(rec.src, v) for k, v in (("shape", SHAPES), ("colour", COLOURS))
                     if any(w in v for w in rec.src.rstrip("?").split())}
            assert answer(other, kind, slots) == similar.target
            assert all((other.by_shape(v) if k == "shape" else other.by_colour(v)) is not None
                       for k, v in slots.items())
        else:
            edited = [o for o in scene.left_to_right() if f"{o.colour} {o.shape}" not in rec.alt]
            [obj] = edited
            assert not ({obj.shape, obj.colour} & q.mentions())
            assert other.by_shape(obj.shape) is not None and similar.target == caption(other)


def test_check_images_sees_a_missing_similar_picture(world: Path, tmp_path: Path) -> None:
    rows = json.loads((world / "vqa_eval.json").read_text())[:2]
    rows[1]["loc_similar_image"] = "images/eval/similar/gone.png"
    path = tmp_path / "vqa_eval.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match="loc_similar_image"):
        check_images(load_mmedit(path, world, "vqa"))


def test_missing_field_names_record_set_and_field(world: Path, tmp_path: Path) -> None:
    rows = json.loads((world / "vqa_eval.json").read_text())[:1]
    del rows[0]["loc_same_image_a"]
    path = tmp_path / "part.json"
    path.write_text(json.dumps(rows))
    rec = load_mmedit(path, world, "vqa")[0]
    with pytest.raises(DataError) as e:
        locality_set_prompts(rec, VQA, "same_image")
    assert "part:0" in str(e.value) and "'same_image'" in str(e.value)
    assert e.value.field == "loc_same_image_a" and e.value.hint
    assert len(locality_set_prompts(rec, VQA, "similar_image")) == 1
    with pytest.raises(ConfigError, match="same_image, similar_image, no_image"):
        locality_set_prompts(rec, VQA, "far_image")
    assert LOCALITY_SETS == ("same_image", "similar_image", "no_image")


def test_empty_locality_field_is_rejected_at_load(tmp_path: Path, world: Path) -> None:
    rows = json.loads((world / "vqa_eval.json").read_text())[:1]
    rows[0]["loc_similar_image_a"] = ""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError) as e:
        load_mmedit(path, world, "vqa")
    assert (e.value.index, e.value.field) == (0, "loc_similar_image_a")
