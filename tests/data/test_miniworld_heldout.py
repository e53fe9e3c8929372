"""The held-out eval split: nothing in it was paired in pretraining, everything else is the eval
split's, and every word of it is one the world (and so the tokenizer) already has."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from mmke.backbones.tiny.corpus import pretraining_prompts, tokenizer_corpus
from mmke.data.builders import MiniWorldSource
from mmke.data.miniworld.generate import ANNOTATION_FILES, MiniWorldSpec, ensure_miniworld
from mmke.data.miniworld.heldout import (HELDOUT_BACKGROUNDS, HELDOUT_CAPTION_PROMPTS,
                                         HELDOUT_FILES, HELDOUT_QUESTION_TEMPLATES, NOISE_STD)
from mmke.data.miniworld.vocab import BACKGROUNDS, CAPTION_PROMPTS, QUESTION_TEMPLATES
from mmke.data.mmedit import check_images, load_mmedit
from tests.conftest import compose_config

SPEC = MiniWorldSpec(seed=5, train_scenes=40, eval_scenes=20, loc_scenes=6, fact_subjects=5,
                     probes_per_category=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_miniworld(tmp_path_factory.mktemp("heldout"), SPEC)


def rows(world: Path, name: str) -> list[dict]:
    return json.loads((world / name).read_text())


def test_no_heldout_wording_is_a_training_wording() -> None:
    for kind, wordings in HELDOUT_QUESTION_TEMPLATES.items():
        assert not set(wordings) & set(QUESTION_TEMPLATES[kind]), kind
    assert not set(HELDOUT_CAPTION_PROMPTS) & set(CAPTION_PROMPTS)
    assert not set(HELDOUT_BACKGROUNDS) & set(BACKGROUNDS)


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_pretraining_never_sees_a_heldout_rephrase(world: Path, task: str) -> None:
    pretraining = pretraining_prompts(world)
    seen = {p.text for p in pretraining}
    source = MiniWorldSource(str(world.parent.parent), task, world=SPEC.__dict__, heldout=True)
    records = source.records("eval")
    assert len(records) == len(rows(world, ANNOTATION_FILES[(task, "eval")]))
    for r in records:
        assert source.templates.edit.format(r.rephrase) not in seen, r.rephrase
    images = {str(p.image.path) for p in pretraining if p.image is not None}
    assert not images & {str(r.image_rephrase.path) for r in records}


def test_every_heldout_word_is_a_word_of_the_world(world: Path) -> None:
    """Compositions of known words: the tokenizer (trained on the plain files) and the model have
    seen every piece of a held-out wording, only not together with that question."""
    words = lambda texts: {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}  # noqa: E731
    known = words(tokenizer_corpus(world))
    for task in HELDOUT_FILES:
        assert words(r["rephrase"] for r in rows(world, HELDOUT_FILES[task])) <= known


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_heldout_rows_keep_the_eval_rows_but_their_rephrases(world: Path, task: str) -> None:
    plain, held = rows(world, ANNOTATION_FILES[(task, "eval")]), rows(world, HELDOUT_FILES[task])
    check_images(load_mmedit(world / HELDOUT_FILES[task], world, task))
    changed = {"rephrase", "image_rephrase"} | ({"alt"} if task == "caption" else set())
    for p, h in zip(plain, held, strict=True):
        assert {k: v for k, v in p.items() if k in h and k not in changed} == \
               {k: v for k, v in h.items() if k not in changed}
        assert h["rephrase"] != p["rephrase"] and h["image_rephrase"] != p["image_rephrase"]


def test_caption_targets_describe_other_pictures(world: Path) -> None:
    """MMEdit's E-IC targets caption another picture; no coloured object of the truth is in them."""
    for r in rows(world, HELDOUT_FILES["caption"]):
        objects = lambda c: set(c.replace(" and ", ", ").split(", "))  # noqa: E731
        assert not objects(r["pred"]) & objects(r["alt"]), r


def test_heldout_picture_is_a_new_background_with_noise(world: Path) -> None:
    for r in rows(world, HELDOUT_FILES["vqa"])[:10]:
        pixels = np.asarray(Image.open(world / r["image_rephrase"]), dtype=np.float32)
        corner = pixels[:4, :4].reshape(-1, 3)  # no object reaches the corners
        nearest = min(HELDOUT_BACKGROUNDS + BACKGROUNDS,
                      key=lambda bg: np.abs(corner.mean(0) - bg).sum())
        assert nearest in HELDOUT_BACKGROUNDS
        assert 0.5 * NOISE_STD < corner.std(0).mean() < 2 * NOISE_STD


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_the_data_configs_score_the_heldout_split(task: str) -> None:
    source = instantiate(compose_config([f"data=mini_{task}_heldout"]).data)
    assert source.files == {"train": ANNOTATION_FILES[(task, "train")], "eval": HELDOUT_FILES[task]}
    assert source.name == f"mini_{task}_heldout" and source.task == task
    plain = instantiate(compose_config([f"data=mini_{task}"]).data)
    assert plain.files["eval"] == ANNOTATION_FILES[(task, "eval")]
    assert plain.annotation_dir == source.annotation_dir  # one world, two eval files
