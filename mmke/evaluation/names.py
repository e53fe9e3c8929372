"""Metric keys and their display names: the one place the papers' column labels live.

Besides the five stored metrics this module defines the papers' table columns that are not
stored as such:

- ``gen`` ("Gen." in ODEdit and ASAM) is the text-rephrase generality, our ``t_gen``;
- ``avg`` ("Avg." in M-ORE) is the plain mean of Rel., T-Gen., M-Gen., T-Loc. and M-Loc.
  (M-ORE Table 4, BLIP2-OPT FT-L_1 on E-VQA: (100 + 100 + 60 + 94.74 + 100) / 5 = 90.95);
- ``avg_delta`` ("Δ" in M-ORE Table 3) is a row's ``avg`` minus the ``avg`` of the full method
  at the same horizon, so it is defined between rows of a table, not for one run;
- cost columns (``time_s``, ``memory_gb``, ...) read from a run summary's ``cost`` mapping.

``PAPER_COLUMNS`` gives each paper's metric columns in its printed order.

Which locality convention each paper's numbers come from (``eval.loc_positions``, see
``mmke.evaluation.spec.POSITIONS``; ``mmke.tables.papers.PAPERS`` requires it of runs):

- ODEdit and ASAM computed every metric with EasyEdit: T-Loc and M-Loc are the ordered top-k
  agreement (k=1 text, k=10 multimodal) over *every* position of the locality sequence, the
  image-token positions included, pre and post right-aligned: ``eval=mmedit``
  (``loc_positions=easyedit``). With BLIP-2's 32 query tokens or LLaVA's 576 patch tokens the
  image positions dominate M-Loc, so the text-only convention (``text``) gives other numbers.
- M-ORE's T-Loc and M-Loc are exp(-KL) of the next-token distribution after the prompt
  (Eq. 17-18): ``eval=more`` (``loc_positions=first``). Its baseline rows were produced with
  EasyEdit too, then scored by M-ORE's own definition.
- MMEdit's own definition of locality (Cheng et al., 2023: is the *output* on an unrelated input
  unchanged) is closest to ``loc_positions=target`` with k=1.

Extra metrics, stored when a run asks for them: ``port`` (VLKEB portability: the one-hop
question answered with the edit's consequence), the DE-VQA locality sets ``loc_<set>``, and the
greedy generated-answer scores ``<metric>_greedy`` (exact match after normalisation; for
locality: the edited model's answer equals the unedited model's) and ``<metric>_greedy_f1``
(token F1; accuracy metrics only). Under ``protocol=online`` every metric also has
``<metric>_final``: the edit scored again on the model at the end of its stream (retention,
M-ORE Figure 3d), its locality against the unedited model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

METRIC_LABELS: dict[str, str] = {
    "rel": "Rel.",
    "t_gen": "T-Gen.",
    "m_gen": "M-Gen.",
    "t_loc": "T-Loc.",
    "m_loc": "M-Loc.",
}

#: The metrics every run stores (percent), in the papers' order.
METRIC_KEYS: tuple[str, ...] = tuple(METRIC_LABELS)

PORT = "port"
#: The metrics scored against a gold answer (the rest compare the edited model with a reference).
ACCURACY_METRICS: tuple[str, ...] = ("rel", "t_gen", "m_gen", PORT)
LOCALITY_SET_LABELS: dict[str, str] = {"same_image": "Loc. same img.",
                                       "similar_image": "Loc. similar img.",
                                       "no_image": "Loc. no img."}
GREEDY_SUFFIX = "_greedy"
F1_SUFFIX = "_greedy_f1"
#: the online protocol's end-of-stream score of an edit on the final model (retention)
FINAL_SUFFIX = "_final"


def locality_set_key(name: str) -> str:
    """The stored key of DE-VQA locality set ``name`` (``same_image`` -> ``loc_same_image``)."""
    return f"loc_{name}"


def greedy_key(metric: str) -> str:
    """The key of ``metric`` scored on greedy generated answers (exact match, normalised)."""
    return metric + GREEDY_SUFFIX


def f1_key(metric: str) -> str:
    """The key of the token F1 of ``metric``'s greedy generated answers."""
    return metric + F1_SUFFIX


def final_key(metric: str) -> str:
    """The key of ``metric`` scored again on the model at the end of an online stream."""
    return metric + FINAL_SUFFIX


def _extra_labels() -> dict[str, str]:
    base = {**METRIC_LABELS, PORT: "Port."}
    base.update({locality_set_key(k): v for k, v in LOCALITY_SET_LABELS.items()})
    labels = dict(base)
    for key, label in base.items():
        labels[greedy_key(key)] = f"{label} (greedy)"
        if key in ACCURACY_METRICS:  # locality compares two answers: no gold to take F1 against
            labels[f1_key(key)] = f"{label} F1 (greedy)"
    labels.update({final_key(k): f"{v} (final)" for k, v in labels.items()})
    return labels


#: Every stored metric key (teacher-forced, extra and greedy) and its printed label.
ALL_METRIC_LABELS: dict[str, str] = _extra_labels()


@dataclass(frozen=True)
class DerivedMetric:
    """A table column computed from stored metrics of one run: the mean of ``inputs``."""

    label: str
    inputs: tuple[str, ...]
    description: str

    def value(self, metrics: Mapping[str, Any]) -> float:
        """The column's value for one run; NaN when any input is missing or not finite."""
        values = []
        for key in self.inputs:
            v = metrics.get(key)
            try:
                v = float(v)
            except (TypeError, ValueError):
                return math.nan
            if not math.isfinite(v):
                return math.nan
            values.append(v)
        return sum(values) / len(values) if values else math.nan


DERIVED_METRICS: dict[str, DerivedMetric] = {
    "gen": DerivedMetric("Gen.", ("t_gen",),
                         "ODEdit/ASAM 'Gen.': generality on the text rephrase (our T-Gen.)"),
    "avg": DerivedMetric("Avg.", METRIC_KEYS,
                         "M-ORE 'Avg.': mean of Rel., T-Gen., M-Gen., T-Loc., M-Loc."),
    greedy_key("gen"): DerivedMetric("Gen. (greedy)", (greedy_key("t_gen"),),
                                     "'Gen.' on greedy generated answers"),
    greedy_key("avg"): DerivedMetric("Avg. (greedy)", tuple(greedy_key(k) for k in METRIC_KEYS),
                                     "'Avg.' of the five metrics on greedy generated answers"),
}


def greedy_column(key: str) -> str | None:
    """The greedy generated-answer counterpart of table column ``key`` (None if it has none)."""
    g = greedy_key(key)
    return g if g in ALL_METRIC_LABELS or g in DERIVED_METRICS else None


@dataclass(frozen=True)
class RelativeMetric:
    """A column defined between two rows of one table: ``of`` minus ``of`` of a reference row
    (the row with the same keys and no ``setting``)."""

    label: str
    of: str
    description: str


RELATIVE_METRICS: dict[str, RelativeMetric] = {
    "avg_delta": RelativeMetric("Δ", "avg", "M-ORE Table 3: a variant's Avg. minus the full "
                                "M-ORE's Avg. at the same number of edits"),
}


@dataclass(frozen=True)
class CostMetric:
    """A cost column read from a run summary: a column named ``cost.<key>`` if the run has
    one, else the first of ``sources`` (flattened summary columns, e.g. ``cost.wall_s``) that
    it has, times ``scale``, divided by column ``per`` when given."""

    label: str
    sources: tuple[str, ...]
    scale: float = 1.0
    per: str | None = None


#: Peak memory, best source first: accelerator memory (what the papers report), then host RSS.
_PEAK_MB = ("cost.peak_mem_mb", "cost.peak_gpu_mb", "cost.gpu_peak_mb", "cost.peak_rss_mb")

COST_METRICS: dict[str, CostMetric] = {
    "time_s": CostMetric("Time (s)", ("cost.wall_s",)),
    "runtime_s": CostMetric("Runtime (s)", ("cost.wall_s",)),
    "edit_s": CostMetric("Edit-T (s)", ("cost.edit_s",)),
    "eval_s": CostMetric("Eval-T (s)", ("cost.eval_s",)),
    "steps": CostMetric("Steps", ("cost.steps",)),
    "memory_gb": CostMetric("Memory (GB)", _PEAK_MB, 1 / 1024),
    "memory_mb": CostMetric("Memory (MB)", _PEAK_MB),
    # ODEdit Table 6: time per optimisation step of the edit (mean edit time / mean steps);
    # training and total time per step only where a run records them under these names.
    "edit_time_per_step_s": CostMetric("Edit-T/sp (s)", ("cost.edit_s",), per="cost.steps"),
    "train_time_per_step_s": CostMetric("Train-T/sp (s)", ()),
    "time_per_step_s": CostMetric("All-T/sp (s)", ()),
}

#: Each paper's metric columns in its printed order (ASAM's "Acc"/"I-Loc" are Rel./M-Loc.).
PAPER_COLUMNS: dict[str, tuple[str, ...]] = {
    "odedit": ("rel", "gen", "t_loc", "m_loc"),
    "asam": ("rel", "gen", "t_loc", "m_loc"),
    "more": ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg"),
}

#: Display names of tasks and backbone families, as the papers print them.
TASK_LABELS: dict[str, str] = {"vqa": "E-VQA", "caption": "E-IC"}
BACKBONE_LABELS: dict[str, str] = {"blip2": "BLIP2-OPT", "minigpt4": "MiniGPT-4",
                                   "llava": "LLaVA-v1.5", "qwen2vl": "Qwen2-VL"}

#: The order columns appear in when a table mixes them.
_TEACHER_FORCED_ORDER = ("rel", "gen", "t_gen", "m_gen", "t_loc", "m_loc", "avg", "avg_delta",
                         PORT, *(locality_set_key(k) for k in LOCALITY_SET_LABELS))
COLUMN_ORDER: tuple[str, ...] = (
    *_TEACHER_FORCED_ORDER,
    # each greedy column (and its F1) in the place of its teacher-forced column
    *(k for base in _TEACHER_FORCED_ORDER for k in (greedy_key(base), f1_key(base))
      if k in ALL_METRIC_LABELS or k in DERIVED_METRICS),
    # the online protocol's retention columns after every per-step column
    *(final_key(k) for k in ALL_METRIC_LABELS if not k.endswith(FINAL_SUFFIX)),
    *COST_METRICS)


def column_label(key: str) -> str:
    """The printed label of a metric or column key (the key itself when unknown)."""
    if key in ALL_METRIC_LABELS:
        return ALL_METRIC_LABELS[key]
    for table in (DERIVED_METRICS, RELATIVE_METRICS, COST_METRICS):
        if key in table:
            return table[key].label
    return key


def order_columns(keys: list[str] | tuple[str, ...]) -> list[str]:
    """``keys`` without duplicates, known columns in ``COLUMN_ORDER``, unknown ones after them
    in their given order."""
    unique = list(dict.fromkeys(keys))
    rank = {k: i for i, k in enumerate(COLUMN_ORDER)}
    return sorted(unique, key=lambda k: (rank.get(k, len(rank)), unique.index(k)))
