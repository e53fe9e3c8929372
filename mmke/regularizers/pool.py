"""Train-split samples for regularizers: out-of-scope prompts (locality terms) and in-scope
neighbours (generality terms), drawn per edit request, never a prompt scored for that request.

Everything here reads the *train* split only. A drawn prompt whose input (text and picture)
matches one of the request's scored prompts is refused (``EditRequest.is_scored``): on the mini
world, text-locality strings recur between splits, so this check is what keeps a text-only
locality prompt of the evaluated record out of the edit.

Draws are deterministic: seeded by the pool's seed and the request's uid/prompt (not by the
global RNG), so the same edit gets the same samples whatever ran before it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Literal

import torch

from mmke.data.prompts import PromptTemplates
from mmke.data.record import EditRecord, Prompt
from mmke.regularizers.base import EditRequest

NeighbourSource = Literal["paraphrase", "same_kind"]
NEIGHBOUR_SOURCES: tuple[str, ...] = ("paraphrase", "same_kind")


class TrainPool:
    """Out-of-scope samples and neighbours from the train split (loaded on first use)."""

    def __init__(self, records: Callable[[], Sequence[EditRecord]], templates: PromptTemplates,
                 seed: int = 0) -> None:
        self._load = records
        self.templates = templates
        self.seed = seed

    @cached_property
    def records(self) -> list[EditRecord]:
        records = list(self._load())
        if not records:
            raise ValueError("the train split is empty: no out-of-scope samples or neighbours")
        return records

    def _generator(self, request: EditRequest, salt: str) -> torch.Generator:
        key = f"{self.seed}\x00{salt}\x00{request.uid}\x00{request.prompt.text}"
        return torch.Generator().manual_seed(zlib.crc32(key.encode()))

    def _draw(self, candidates: list[Prompt], n: int, request: EditRequest,
              salt: str) -> list[Prompt]:
        allowed = [p for p in candidates if not request.is_scored(p)]
        if not allowed or n <= 0:
            return []
        order = torch.randperm(len(allowed), generator=self._generator(request, salt)).tolist()
        return [allowed[i] for i in order[:n]]

    def out_of_scope(self, request: EditRequest, n: int) -> list[Prompt]:
        """``n`` locality prompts of train records (text and multimodal, alternating as drawn),
        each with the true answer as target. Records of the request's question kind are skipped,
        so a sample does not ask what the edit changes."""
        t = self.templates
        candidates: list[Prompt] = []
        for r in self.records:
            if request.kind and r.extras.get("kind") == request.kind:
                continue
            candidates.append(Prompt(t.t_loc.format(r.loc), r.loc_ans, None, "t_loc"))
            candidates.append(Prompt(t.m_loc.format(r.m_loc_q), r.m_loc_a, r.m_loc, "m_loc"))
        return self._draw(candidates, n, request, "out_of_scope")

    def neighbours(self, request: EditRequest, n: int,
                   source: NeighbourSource = "paraphrase") -> list[Prompt]:
        """``n`` in-scope neighbours of the edit prompt, target the new answer.

        ``paraphrase``: train-split paraphrases of the edit question (the ``rephrase`` of train
        records whose ``src`` is the edit question) asked about the edit's own picture; any that is
        a scored prompt of the record (its text rephrase on its picture) is refused. When fewer
        than ``n`` are left, tops up with ``same_kind``: the question of a train record of the same task and
        question kind, with that record's picture."""
        t = self.templates
        edit = request.prompt
        if source not in NEIGHBOUR_SOURCES:
            raise ValueError(f"unknown neighbour source {source!r}; expected {NEIGHBOUR_SOURCES}")
        if source == "paraphrase":
            texts = sorted({t.edit.format(r.rephrase) for r in self.records
                            if r.task == request.task and t.edit.format(r.src) == edit.text}
                           - {edit.text})
            found = self._draw([Prompt(x, edit.target, edit.image, "t_gen") for x in texts], n,
                               request, "paraphrase")
            if len(found) >= n:
                return found
        else:
            found = []
        same = [Prompt(t.edit.format(r.src), edit.target, r.image, "t_gen") for r in self.records
                if r.task == request.task and (not request.kind or r.extras.get("kind") == request.kind)
                and r.image is not None]
        return found + self._draw(same, n - len(found), request, "same_kind")
