"""Turn an EditRecord into the prompts each metric scores (task templates live in the data config)."""

from __future__ import annotations

from dataclasses import dataclass

from mmke.data.record import EditRecord, Prompt

# MMEdit's E-VQA template (Cheng et al., 2023; EasyEdit's multimodal trainer uses the same string).
VQA_TEMPLATE = "Question: {} Short answer:"
CAPTION_TEMPLATE = "{}"


@dataclass(frozen=True)
class PromptTemplates:
    """How record text becomes prompt text.

    ``edit`` wraps ``src`` and ``rephrase`` (E-VQA's question template, or the bare caption prompt
    for E-IC); ``m_loc`` wraps the multimodal-locality question, which is a VQA question in both
    tasks; ``t_loc`` wraps the text-locality prompt (MMEdit uses the NQ string as is).
    """

    edit: str = VQA_TEMPLATE
    m_loc: str = VQA_TEMPLATE
    t_loc: str = "{}"


def edit_prompts(record: EditRecord, templates: PromptTemplates) -> list[Prompt]:
    """The five evaluation prompts of one record, in the fixed order rel, t_gen, m_gen, t_loc, m_loc.

    Rel/T-Gen/M-Gen target the new answer ``alt``; the locality prompts target their own answers,
    which are teacher-forced so pre- and post-edit predictions compare at the same positions.
    """
    e = templates.edit
    return [
        Prompt(e.format(record.src), record.alt, record.image, "rel"),
        Prompt(e.format(record.rephrase), record.alt, record.image, "t_gen"),
        Prompt(e.format(record.src), record.alt, record.image_rephrase, "m_gen"),
        Prompt(templates.t_loc.format(record.loc), record.loc_ans, None, "t_loc"),
        Prompt(templates.m_loc.format(record.m_loc_q), record.m_loc_a, record.m_loc, "m_loc"),
    ]


def original_prompt(record: EditRecord, templates: PromptTemplates) -> Prompt:
    """The edit question with the unedited answer ``pred`` as target (what the model knew)."""
    return Prompt(templates.edit.format(record.src), record.pred, record.image, "orig")
