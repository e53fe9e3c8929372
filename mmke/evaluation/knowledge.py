"""What an unedited model knows of its world: the bar a tiny backbone must pass before editing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from mmke.backbones.base import Backbone
from mmke.data.prompts import PromptTemplates, edit_prompts, original_prompt
from mmke.data.record import EditRecord
from mmke.evaluation.metrics import exact_match, token_accuracy
from mmke.evaluation.scoring import Need, score_prompts


#: What ``knowledge_report`` can score per record, in the order its prompts are built.
KNOWLEDGE_KINDS = ("orig", "orig_rephrase", "orig_image_rephrase", "t_loc", "m_loc", "alt")


@torch.no_grad()
def knowledge_report(backbone: Backbone, records: Sequence[EditRecord], templates: PromptTemplates,
                     batch_size: int = 96,
                     kinds: Sequence[str] = KNOWLEDGE_KINDS) -> dict[str, float]:
    """Exact-match accuracy of the original answers (``orig``), the text-locality answers and the
    multimodal-locality answers; of the original answer asked through the text rephrase
    (``orig_rephrase``) and through the image rephrase (``orig_image_rephrase``): whether the
    model understands the rephrases at all, which T-Gen and M-Gen presuppose; and how much of
    the new target ``alt`` is already predicted, exactly (``alt``) and in tokens
    (``alt_tokens``, the unedited model's Rel in MMEdit's token accuracy). ``kinds``: which of
    ``KNOWLEDGE_KINDS`` to score (``alt`` brings ``alt_tokens``)."""
    unknown = set(kinds) - set(KNOWLEDGE_KINDS)
    if unknown:
        raise ValueError(f"unknown knowledge kinds {sorted(unknown)}; known: {KNOWLEDGE_KINDS}")
    kinds = tuple(k for k in KNOWLEDGE_KINDS if k in kinds)
    prompts = []
    for r in records:
        rel, t_gen, m_gen, t_loc, m_loc = edit_prompts(r, templates)
        every = {"orig": original_prompt(r, templates),
                 "orig_rephrase": replace(t_gen, target=r.pred, kind="orig"),
                 "orig_image_rephrase": replace(m_gen, target=r.pred, kind="orig"),
                 "t_loc": t_loc, "m_loc": m_loc, "alt": rel}
        prompts += [every[k] for k in kinds]
    hits = {k: 0.0 for k in (*kinds, *(("alt_tokens",) if "alt" in kinds else ()))}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out = score_prompts(backbone.forward, backbone, chunk, [Need()] * len(chunk), "target")
        for i, o in enumerate(out):
            kind = kinds[(start + i) % len(kinds)]
            hits[kind] += exact_match(o.target_correct)
            if kind == "alt":
                hits["alt_tokens"] += token_accuracy(o.target_correct)
    return {k: v / max(1, len(records)) for k, v in hits.items()}
