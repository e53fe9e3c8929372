"""Shared by the editor tests: an eval record the unedited model already answers right."""

from mmke.data.prompts import edit_prompts
from mmke.data.record import EditRecord, Prompt


def answered_record(backbone, source, limit: int = 20) -> tuple[EditRecord, Prompt]:
    """The first of ``limit`` eval records whose greedy answer is its ``pred``, and its Rel prompt:
    an edit that changes that answer is visible, and restore must bring it back."""
    candidates = source.records("eval", limit=limit)
    prompts = [edit_prompts(r, source.templates)[0] for r in candidates]
    answers = backbone.generate(prompts)
    return next((r, p) for r, p, a in zip(candidates, prompts, answers) if a == r.pred)
