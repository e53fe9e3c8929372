"""General-capability probes (M-ORE §5.3, Figure 5): does editing keep what the model could do?

A probe set is a few categories of image questions (MME's, or the mini world's MME-style
existence / count / position / colour sets). Each probe is scored teacher-forced, right when
every answer token is the argmax (exact match). Per category (MME, Fu et al. 2023):

- ``accuracy``: share of questions answered right;
- ``accuracy_plus``: share of images whose questions are all right (MME asks two per image);
  None when every image has a single question, where it would equal ``accuracy``;
- ``mme_score``: ``accuracy + accuracy_plus`` (both in percent, so 0-200), MME's category score.

The loaders are in ``mmke.evaluation.probe_sets``; the protocols decide when to probe
(``mmke.protocols.base``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmke.data.record import Prompt

#: The fields of one probe row (per model state and category), besides where it was taken.
PROBE_FIELDS = ("category", "n", "n_images", "accuracy", "accuracy_plus", "mme_score")


@dataclass(frozen=True)
class ProbeCategory:
    """One category's probes: ``prompts[i]`` asks about image ``images[i]`` (a key that groups
    an image's questions for accuracy+)."""

    name: str
    prompts: tuple[Prompt, ...]
    images: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.images):
            raise ValueError("one image key per probe prompt is needed")

    @property
    def paired(self) -> bool:
        """Whether some image has more than one question (then accuracy+ is reported)."""
        return len(set(self.images)) < len(self.images)


@dataclass(frozen=True)
class ProbeSet:
    """Named categories of probes, in report order."""

    name: str
    categories: tuple[ProbeCategory, ...]

    @property
    def prompts(self) -> list[Prompt]:
        """Every probe prompt, category after category (the order ``score_categories`` reads)."""
        return [p for c in self.categories for p in c.prompts]


def category_scores(category: ProbeCategory, correct: Sequence[bool]) -> dict:
    """The row of ``category`` (``PROBE_FIELDS``, metrics in percent) from per-probe results."""
    if len(correct) != len(category.prompts):
        raise ValueError(f"{len(correct)} results for {len(category.prompts)} probes")
    by_image: dict[str, bool] = {}
    for image, right in zip(category.images, correct):
        by_image[image] = by_image.get(image, True) and bool(right)
    accuracy = 100.0 * sum(map(bool, correct)) / max(1, len(correct))
    plus = 100.0 * sum(by_image.values()) / max(1, len(by_image)) if category.paired else None
    return {"category": category.name, "n": len(correct), "n_images": len(by_image),
            "accuracy": accuracy, "accuracy_plus": plus,
            "mme_score": None if plus is None else accuracy + plus}


def score_categories(probes: ProbeSet, correct: Sequence[bool]) -> list[dict]:
    """One row per category from the results of ``probes.prompts`` in order."""
    rows, start = [], 0
    for category in probes.categories:
        end = start + len(category.prompts)
        rows.append(category_scores(category, correct[start:end]))
        start = end
    return rows
