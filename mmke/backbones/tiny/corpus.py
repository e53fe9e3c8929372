"""What a tiny backbone learns from: the mini world's train split, and the texts of its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from mmke.data.miniworld.generate import ANNOTATION_FILES
from mmke.data.mmedit import load_mmedit
from mmke.data.prompts import CAPTION_TEMPLATE, VQA_TEMPLATE
from mmke.data.record import Prompt


def pretraining_prompts(world: Path, fact_repeats: int = 8) -> list[Prompt]:
    """True-answer prompts from the train split of both tasks: each question with its image,
    its rephrase, and its re-rendered image; every locality question once; every fact of the
    world ``fact_repeats`` times (facts are memorised, pictures are generalised)."""
    prompts: list[Prompt] = []
    seen_m_loc: set[tuple[str, str]] = set()
    for task, template in (("vqa", VQA_TEMPLATE), ("caption", CAPTION_TEMPLATE)):
        for r in load_mmedit(world / ANNOTATION_FILES[(task, "train")], world, task):
            prompts += [Prompt(template.format(r.src), r.pred, r.image, "orig"),
                        Prompt(template.format(r.rephrase), r.pred, r.image, "orig"),
                        Prompt(template.format(r.src), r.pred, r.image_rephrase, "orig")]
            key = (str(r.m_loc.path), r.m_loc_q)
            if key not in seen_m_loc:
                seen_m_loc.add(key)
                prompts.append(Prompt(VQA_TEMPLATE.format(r.m_loc_q), r.m_loc_a, r.m_loc, "m_loc"))
    facts = json.loads((world / "facts.json").read_text())
    prompts += [Prompt(f["question"], f["answer"], None, "t_loc") for f in facts] * fact_repeats
    return prompts


def tokenizer_corpus(world: Path) -> list[str]:
    """Every string of the world's annotation files (both splits) and the prompt templates."""
    texts = [VQA_TEMPLATE]
    for name in ANNOTATION_FILES.values():
        for row in json.loads((world / name).read_text()):
            texts += [row[k] for k in ("src", "pred", "rephrase", "alt", "loc", "loc_ans",
                                       "m_loc_q", "m_loc_a")]
    return texts
