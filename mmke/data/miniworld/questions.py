"""Questions about a scene with their true answer and counterfactual alternatives."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmke.data.miniworld.scene import Scene, SceneObject
from mmke.data.miniworld.vocab import (CAPTION_PROMPTS, COLOURS, COLUMNS, COUNT_WORDS,
                                       QUESTION_TEMPLATES, SHAPES, SIZES)


@dataclass(frozen=True)
class Question:
    kind: str
    texts: tuple[str, ...]  # every template of the kind, filled; texts[0] is the canonical one
    answer: str
    alternatives: tuple[str, ...]  # same-type answers that are false for this scene
    # The template slots (e.g. {"shape": "square"}): which object or attribute the question names.
    slots: dict[str, str] = field(default_factory=dict)

    def mentions(self) -> set[str]:
        """The vocabulary words this question and its answer are about."""
        return {*self.slots.values(), self.answer}


def _fill(kind: str, **slots: str) -> tuple[str, ...]:
    return tuple(t.format(**slots) for t in QUESTION_TEMPLATES[kind])


def _others(values, answer: str) -> tuple[str, ...]:
    return tuple(v for v in values if v != answer)


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> Question:
    """A question of ``kind`` about a random object of ``scene``."""
    obj = scene.objects[int(rng.integers(0, len(scene.objects)))]
    if kind == "existence":  # the object drawn above is unused; the shape is drawn here
        return ask_with(scene, kind, {"shape": SHAPES[int(rng.integers(0, len(SHAPES)))]})
    return ask_with(scene, kind, _naming(kind, obj))


# Which attribute of an object a question kind names it by ("the square", "the red object").
_NAMED_BY = {"colour": "shape", "shape": "colour", "position": "shape", "size": "shape",
             "count": None, "existence": "shape"}
_VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "position": COLUMNS, "size": SIZES}
_ATTRIBUTE = {"colour": "colour", "shape": "shape", "position": "column", "size": "size"}


def _naming(kind: str, obj: SceneObject) -> dict[str, str]:
    by = _NAMED_BY[kind]
    return {} if by is None else {by: getattr(obj, by)}


def answer(scene: Scene, kind: str, slots: dict[str, str]) -> str | None:
    """The true answer of the question ``kind`` filled with ``slots`` on ``scene``; None when the
    question does not apply (it names an object the scene lacks)."""
    if kind == "count":
        return COUNT_WORDS[len(scene.objects) - 1]
    if kind == "existence":
        return "yes" if scene.by_shape(slots["shape"]) else "no"
    by = _NAMED_BY[kind]
    obj = scene.by_shape(slots[by]) if by == "shape" else scene.by_colour(slots[by])
    return None if obj is None else getattr(obj, _ATTRIBUTE[kind])


def ask_with(scene: Scene, kind: str, slots: dict[str, str]) -> Question:
    """The question ``kind`` with the given slots, answered on ``scene`` (no randomness)."""
    if kind not in QUESTION_TEMPLATES:
        raise ValueError(f"unknown question kind {kind}")
    true = answer(scene, kind, slots)
    if true is None:
        raise ValueError(f"{kind} question with {slots} names no object of the scene")
    values = {"count": COUNT_WORDS, "existence": ("yes", "no")}.get(kind) or _VALUES[kind]
    return Question(kind, _fill(kind, **slots), true, _others(values, true), dict(slots))


def all_questions(scene: Scene) -> list[Question]:
    """Every question the templates can ask about ``scene``, in a fixed order: each object-naming
    kind about each object, existence of each shape, and the count."""
    out = [ask_with(scene, kind, _naming(kind, obj))
           for kind in ("colour", "shape", "position", "size") for obj in scene.objects]
    out += [ask_with(scene, "existence", {"shape": s}) for s in SHAPES]
    return out + [ask_with(scene, "count", {})]


def caption(scene: Scene) -> str:
    """Objects left to right: "red square, blue circle and green diamond"."""
    parts = [f"{o.colour} {o.shape}" for o in scene.left_to_right()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def counterfactual_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The caption with one object's colour swapped for one absent from the scene."""
    objs = scene.left_to_right()
    i = int(rng.integers(0, len(objs)))
    used = {o.colour for o in objs}
    free = [c for c in COLOURS if c not in used]
    new = free[int(rng.integers(0, len(free)))]
    parts = [f"{new if j == i else o.colour} {o.shape}" for j, o in enumerate(objs)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_prompts() -> tuple[str, ...]:
    return CAPTION_PROMPTS
