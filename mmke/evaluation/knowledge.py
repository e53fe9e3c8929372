"""What an unedited model knows of its world: the bar a tiny backbone must pass before editing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmke.backbones.base import Backbone
from mmke.data.prompts import PromptTemplates, edit_prompts, original_prompt
from mmke.data.record import EditRecord
from mmke.evaluation.metrics import exact_match
from mmke.evaluation.scoring import Need, score_prompts


@torch.no_grad()
def knowledge_report(backbone: Backbone, records: Sequence[EditRecord], templates: PromptTemplates,
                     batch_size: int = 96) -> dict[str, float]:
    """Exact-match accuracy of the original answers (``pred``), the text-locality answers and the
    multimodal-locality answers, plus how often the new target ``alt`` is already predicted."""
    kinds = ("orig", "t_loc", "m_loc", "alt")
    prompts = []
    for r in records:
        rel, _, _, t_loc, m_loc = edit_prompts(r, templates)
        prompts += [original_prompt(r, templates), t_loc, m_loc, rel]
    hits = {k: 0.0 for k in kinds}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out = score_prompts(backbone.forward, backbone, chunk, [Need()] * len(chunk), "target")
        for i, o in enumerate(out):
            hits[kinds[(start + i) % len(kinds)]] += exact_match(o.target_correct)
    return {k: v / max(1, len(records)) for k, v in hits.items()}
