"""Fields beyond the MMEdit schema: VLKEB-style one-hop portability and DE-VQA locality sets.

Everything here is asked with the existing question templates only, so a tiny backbone pretrained
on the world already understands the wording; only the combination with the edit is new.
"""

from __future__ import annotations

import numpy as np

from mmke.data.miniworld.questions import Question, all_questions, caption
from mmke.data.miniworld.scene import Scene, SceneObject, sample_scene
from mmke.data.miniworld.vocab import QUESTION_TEMPLATES

# Seed of the second generator, ``np.random.default_rng([spec.seed, EXTRA_STREAM])``: everything in
# this module draws from it, never from the world's main generator, so every pre-existing field,
# picture and scene of a world stays bit-identical (the tiny backbones are pretrained on them).
EXTRA_STREAM = 7
# Rejection sampling of a similar scene; one that contains a given colour comes up 1 time in 3.
_MAX_TRIES = 1000


def onehop(scene: Scene, edit: Question, alt: str) -> list[dict[str, str]]:
    """VLKEB ``port_new`` entries for an edit of ``edit`` to ``alt``: the question whose answer
    follows from the edited attribute, about the same picture.

    A colour edit "What colour is the square?" -> blue gives "What shape is the blue object?" ->
    square; a shape edit "What shape is the red object?" -> square gives "What colour is the
    square?" -> red. Empty for other kinds, and when another object of the scene already has the
    new attribute (the one-hop question would name two objects). No ``port_edit_q``/``port_edit_a``:
    the answer follows from the edit alone, there is no second fact to inject.
    """
    if edit.kind == "colour" and scene.by_colour(alt) is None:
        question, target = QUESTION_TEMPLATES["shape"][0].format(colour=alt), edit.slots["shape"]
    elif edit.kind == "shape" and scene.by_shape(alt) is None:
        question, target = QUESTION_TEMPLATES["colour"][0].format(shape=alt), edit.slots["colour"]
    else:
        return []
    return [{"port_q": question, "port_a": target}]


def unrelated_question(scene: Scene, edit_kind: str, forbidden: set[str],
                       rng: np.random.Generator) -> Question | None:
    """A question about ``scene`` of another kind than the edit's that names none of the edit's
    words (``forbidden``: the object it names, the old and the new answer), so the edit gives no
    reason to change its answer; None when the scene offers none."""
    candidates = [q for q in all_questions(scene)
                  if q.kind != edit_kind and not (q.mentions() & forbidden)]
    return candidates[int(rng.integers(0, len(candidates)))] if candidates else None


def similar_scene(scene: Scene, slots: dict[str, str], rng: np.random.Generator) -> Scene:
    """Another scene containing what ``slots`` name (e.g. a square, or a red object)."""
    for _ in range(_MAX_TRIES):
        other = sample_scene(rng)
        if other.objects != scene.objects and all(
                (other.by_shape(v) if k == "shape" else other.by_colour(v)) is not None
                for k, v in slots.items()):
            return other
    raise RuntimeError(f"no scene with {slots} in {_MAX_TRIES} draws")  # ~1e-176 for a colour


def caption_edit(scene: Scene, alt: str) -> tuple[SceneObject, str]:
    """The object a counterfactual caption recolours, and its new colour."""
    parts = alt.replace(" and ", ", ").split(", ")
    for obj, part in zip(scene.left_to_right(), parts):
        if part != f"{obj.colour} {obj.shape}":
            return obj, part.split()[0]
    raise ValueError(f"{alt!r} changes nothing of {caption(scene)!r}")
