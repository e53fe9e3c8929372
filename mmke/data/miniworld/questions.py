"""Questions about a scene with their true answer and counterfactual alternatives."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmke.data.miniworld.scene import Scene
from mmke.data.miniworld.vocab import (CAPTION_PROMPTS, COLOURS, COLUMNS, COUNT_WORDS,
                                       QUESTION_TEMPLATES, SHAPES, SIZES)


@dataclass(frozen=True)
class Question:
    kind: str
    texts: tuple[str, ...]  # every template of the kind, filled; texts[0] is the canonical one
    answer: str
    alternatives: tuple[str, ...]  # same-type answers that are false for this scene


def _fill(kind: str, **slots: str) -> tuple[str, ...]:
    return tuple(t.format(**slots) for t in QUESTION_TEMPLATES[kind])


def _others(values, answer: str) -> tuple[str, ...]:
    return tuple(v for v in values if v != answer)


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> Question:
    """A question of ``kind`` about a random object of ``scene``."""
    obj = scene.objects[int(rng.integers(0, len(scene.objects)))]
    if kind == "colour":
        return Question(kind, _fill(kind, shape=obj.shape), obj.colour, _others(COLOURS, obj.colour))
    if kind == "shape":
        return Question(kind, _fill(kind, colour=obj.colour), obj.shape, _others(SHAPES, obj.shape))
    if kind == "position":
        return Question(kind, _fill(kind, shape=obj.shape), obj.column, _others(COLUMNS, obj.column))
    if kind == "size":
        return Question(kind, _fill(kind, shape=obj.shape), obj.size, _others(SIZES, obj.size))
    if kind == "count":
        answer = COUNT_WORDS[len(scene.objects) - 1]
        return Question(kind, _fill(kind), answer, _others(COUNT_WORDS, answer))
    if kind == "existence":
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        answer = "yes" if scene.by_shape(shape) else "no"
        return Question(kind, _fill(kind, shape=shape), answer, _others(("yes", "no"), answer))
    raise ValueError(f"unknown question kind {kind}")


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
