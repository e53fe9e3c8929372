"""Which metric definitions a run uses (``conf/eval/*.yaml``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from mmke.data.prompts import LOCALITY_SETS
from mmke.errors import ConfigError, check_choice

ACCURACY = ("token", "exact")
LOCALITY = ("topk", "kl")
#: Which positions of a locality prompt are compared (``mmke.evaluation.scoring``):
#: ``easyedit``  every position of the sequence but the last, image positions included, pre and
#:               post right-aligned (EasyEdit's ``logits[:, :-1]``; the papers' numbers);
#: ``text``      every text position, image positions left out (mmke's earlier ``all``);
#: ``target``    the teacher-forced answer positions (closest to MMEdit's "is the output
#:               unchanged" with k=1);
#: ``first``     the first answer position: the next-token distribution after the prompt (M-ORE).
POSITIONS = ("easyedit", "text", "target", "first")
MODES = ("teacher_forced", "generate", "both")
#: General-capability probe sets (``mmke.evaluation.probe_sets``): none, the mini world's
#: MME-style sets, or MME's released folder (``probes_root``).
PROBE_SETS = ("none", "miniworld", "mme")
LOCALITY_SET_NAMES = LOCALITY_SETS


@dataclass(frozen=True)
class MetricSpec:
    """``accuracy``: token accuracy or exact match for Rel/T-Gen/M-Gen/Port. ``locality``: MMEdit
    top-k agreement or M-ORE exp(-KL), at the ``loc_positions`` convention (see ``POSITIONS``).
    ``mode``: teacher-forced scoring, greedy generated answers (``max_new_tokens`` at most, a limit
    that never depends on the target), or both side by side. ``locality_sets``: DE-VQA's harder
    locality prompts to score as well (``LOCALITY_SET_NAMES``). ``port_edit``: VLKEB's one-hop
    protocol, in which Port. is scored after a second, text-only edit of the record's
    ``port_edit_q`` -> ``port_edit_a`` (single-edit protocol only); off, Port. is scored on the
    model of the main edit, with the other metrics.

    ``probes``: general-capability probes (M-ORE Figure 5) on the unedited model and, in stream
    protocols, after every ``probes_every`` edits of a stream (0: at its end only) and at its
    end; ``probes_limit`` questions per category at most (0: all); ``probes_root``: MME's folder
    for ``probes=mme``; ``probes_categories``: which categories (empty: all)."""

    accuracy: Literal["token", "exact"] = "token"
    locality: Literal["topk", "kl"] = "topk"
    t_loc_k: int = 1
    m_loc_k: int = 10
    loc_positions: Literal["easyedit", "text", "target", "first"] = "easyedit"
    batch_size: int = 64
    mode: Literal["teacher_forced", "generate", "both"] = "teacher_forced"
    max_new_tokens: int = 16
    locality_sets: Sequence[str] = field(default_factory=tuple)
    port_edit: bool = False
    probes: Literal["none", "miniworld", "mme"] = "none"
    probes_every: int = 0
    probes_limit: int = 0
    probes_root: str | None = None
    probes_categories: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.loc_positions == "all":
            raise ConfigError("eval.loc_positions=all was renamed: use 'text' for every text "
                              "position (the old meaning) or 'easyedit' for EasyEdit's convention "
                              "(image positions included), which the papers' numbers use")
        for name, value, allowed in (("accuracy", self.accuracy, ACCURACY),
                                     ("locality", self.locality, LOCALITY),
                                     ("loc_positions", self.loc_positions, POSITIONS),
                                     ("mode", self.mode, MODES),
                                     ("probes", self.probes, PROBE_SETS)):
            check_choice(f"eval.{name}", value, allowed)
        if self.t_loc_k < 1 or self.m_loc_k < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("eval.t_loc_k, eval.m_loc_k, eval.batch_size and "
                              "eval.max_new_tokens must be >= 1")
        unknown = [s for s in self.locality_sets if s not in LOCALITY_SET_NAMES]
        if unknown:
            raise ConfigError(f"eval.locality_sets: unknown set(s) {unknown}; known: "
                              f"{list(LOCALITY_SET_NAMES)}")
        object.__setattr__(self, "locality_sets", tuple(self.locality_sets))
        if self.probes_every < 0 or self.probes_limit < 0:
            raise ConfigError("eval.probes_every and eval.probes_limit must be >= 0 (0: probe at "
                              "the end of each stream only / every probe of a category)")
        if self.probes == "mme" and not self.probes_root:
            raise ConfigError("eval.probes=mme needs eval.probes_root: the folder of MME's "
                              "release, one folder per category (existence/, count/, OCR/, ...)")
        object.__setattr__(self, "probes_categories", tuple(self.probes_categories))

    @property
    def teacher_forced(self) -> bool:
        return self.mode in ("teacher_forced", "both")

    @property
    def generated(self) -> bool:
        return self.mode in ("generate", "both")
