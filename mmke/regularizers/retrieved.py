"""Retrieved paraphrases: ASAM Table 4's "SimCSE" variants (§5.3, "SimCSE-based paraphrases
constructed by retrieving semantically similar rephrases using sentence embedding similarity").

The bank is every distinct phrasing of the train split's edit questions of a task (``src`` and
``rephrase``, templated as the edit prompt is), embedded once by the shared sentence encoder
(all-MiniLM-L6-v2 standing in for SimCSE; ``mmke.encoders``) and cached on disk. An edit's
variants are the bank phrasings nearest its prompt, asked about the edit's picture with the new
target; the edit prompt itself and any prompt scored for the record are never picked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import torch

from mmke.data.prompts import PromptTemplates
from mmke.data.record import EditRecord, Prompt
from mmke.encoders import SentenceEncoder, cached_encode, nearest
from mmke.errors import ConfigError
from mmke.regularizers.base import EditRequest


class RetrievedParaphrases:
    """Per task, the train split's phrasings and their embeddings (built on first use)."""

    def __init__(self, records: Callable[[], Sequence[EditRecord]], templates: PromptTemplates,
                 encoder: SentenceEncoder) -> None:
        self._load = records
        self.templates = templates
        self.encoder = encoder

    @cached_property
    def bank(self) -> dict[str, tuple[list[str], torch.Tensor]]:
        phrasings: dict[str, set[str]] = {}
        for r in self._load():
            phrasings.setdefault(r.task, set()).update(
                self.templates.edit.format(q) for q in (r.src, r.rephrase))
        out = {}
        for task, texts in phrasings.items():
            ordered = sorted(texts)
            out[task] = ordered, cached_encode(self.encoder, ordered)
        return out

    def variants(self, request: EditRequest, n: int) -> list[Prompt]:
        """Up to ``n`` phrasings nearest the edit prompt (fewer when the task has fewer, as
        E-IC's few caption prompts), most similar first."""
        edit = request.prompt
        if request.task not in self.bank:
            raise ConfigError(f"reg.variants=simcse: the train split has no {request.task} record")
        texts, embeddings = self.bank[request.task]
        exclude = [i for i, t in enumerate(texts) if t == edit.text
                   or request.is_scored(Prompt(t, edit.target, edit.image, "t_gen"))]
        k = min(n, len(texts) - len(exclude))
        if k < 1:
            raise ConfigError("reg.variants=simcse: no train phrasing is left for this edit")
        query = self.encoder.encode([edit.text]).to(embeddings.device)
        found = nearest(query, embeddings, k, exclude=[exclude])
        return [Prompt(texts[i], edit.target, edit.image, "t_gen") for i in found.indices[0].tolist()]
