"""Which metric definitions a run uses (``conf/eval/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmke.errors import ConfigError

ACCURACY = ("token", "exact")
LOCALITY = ("topk", "kl")
POSITIONS = ("all", "target", "first")


@dataclass(frozen=True)
class MetricSpec:
    """``accuracy``: token accuracy or exact match for Rel/T-Gen/M-Gen. ``locality``: MMEdit top-k
    agreement or M-ORE exp(-KL). ``loc_positions``: which positions of a locality prompt compare:
    ``all`` text positions (EasyEdit), the ``target`` positions (teacher-forced answer), or the
    ``first`` answer position (the next-token distribution after the prompt, as M-ORE's Eq. 17)."""

    accuracy: Literal["token", "exact"] = "token"
    locality: Literal["topk", "kl"] = "topk"
    t_loc_k: int = 1
    m_loc_k: int = 10
    loc_positions: Literal["all", "target", "first"] = "all"
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name, value, allowed in (("accuracy", self.accuracy, ACCURACY),
                                     ("locality", self.locality, LOCALITY),
                                     ("loc_positions", self.loc_positions, POSITIONS)):
            if value not in allowed:
                raise ConfigError(f"eval.{name}={value!r} is not one of {allowed}")
        if self.t_loc_k < 1 or self.m_loc_k < 1 or self.batch_size < 1:
            raise ConfigError("eval.t_loc_k, eval.m_loc_k and eval.batch_size must be >= 1")
