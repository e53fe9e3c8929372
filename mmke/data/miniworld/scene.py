"""Scenes of the mini world: 1-3 objects, each a distinct shape and colour in its own column."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmke.data.miniworld.vocab import BACKGROUNDS, COLOURS, COLUMNS, SHAPES, SIZES


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    column: str
    size: str


@dataclass(frozen=True)
class Scene:
    """What is in a picture. Shapes and colours are unique within a scene, so "the square" and
    "the red object" always name one object."""

    objects: tuple[SceneObject, ...]

    def by_shape(self, shape: str) -> SceneObject | None:
        return next((o for o in self.objects if o.shape == shape), None)

    def by_colour(self, colour: str) -> SceneObject | None:
        return next((o for o in self.objects if o.colour == colour), None)

    def left_to_right(self) -> list[SceneObject]:
        return sorted(self.objects, key=lambda o: COLUMNS.index(o.column))


@dataclass(frozen=True)
class Rendering:
    """How a scene is drawn: the image rephrase re-draws the same scene with other values."""

    background: tuple[int, int, int]
    jitter: tuple[tuple[int, int], ...]  # per-object (dx, dy) in pixels
    scale: float


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 4))
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    columns = sorted(rng.choice(len(COLUMNS), size=n, replace=False))
    names = list(COLOURS)
    objects = tuple(
        SceneObject(SHAPES[s], names[c], COLUMNS[col], SIZES[int(rng.integers(0, 2))])
        for s, c, col in zip(shapes, colours, columns)
    )
    return Scene(objects)


def sample_rendering(rng: np.random.Generator, n_objects: int, max_jitter: int = 1) -> Rendering:
    """Background, per-object pixel jitter and overall scale. Jitter stays small so an object stays
    inside its column's cell: a tiny vision tower trained from scratch on a few thousand pictures
    learns shapes at stable positions, not under translation (measured)."""
    background = BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))]
    jitter = tuple((int(rng.integers(-max_jitter, max_jitter + 1)),
                    int(rng.integers(-max_jitter, max_jitter + 1))) for _ in range(n_objects))
    return Rendering(background, jitter, float(rng.uniform(0.85, 1.15)))
