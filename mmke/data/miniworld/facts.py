"""Text-only facts of the mini world (NQ-like): invented places with a capital and a river."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmke.data.miniworld.vocab import FACT_TEMPLATES, SYLLABLES


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str


def _name(rng: np.random.Generator, syllables: int) -> str:
    return "".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), size=syllables))


def fact_bank(rng: np.random.Generator, n_subjects: int) -> list[Fact]:
    """``n_subjects`` distinct invented places, each with one fact per template."""
    subjects: list[str] = []
    while len(subjects) < n_subjects:
        name = _name(rng, 3)
        if name not in subjects:
            subjects.append(name)
    facts = []
    for subject in subjects:
        for relation, template in FACT_TEMPLATES.items():
            answer = _name(rng, 2) + (" river" if relation == "river" else "")
            facts.append(Fact(template.format(subject=subject), answer))
    return facts
