"""Turn an EditRecord into the prompts each metric scores (task templates live in the data config)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mmke.data.record import EditRecord, LazyImage, Prompt, PromptKind
from mmke.errors import ConfigError, DataError

# MMEdit's E-VQA template (Cheng et al., 2023; EasyEdit's multimodal trainer uses the same string).
VQA_TEMPLATE = "Question: {} Short answer:"
CAPTION_TEMPLATE = "{}"

PORTABILITY_KIND: PromptKind = "port"
# DE-VQA's harder locality (arXiv 2511.13243), kind f"loc_{name}" each.
LOCALITY_SETS: tuple[str, ...] = ("same_image", "similar_image", "no_image")
_LOCALITY_KINDS: dict[str, PromptKind] = {"same_image": "loc_same_image",
                                          "similar_image": "loc_similar_image",
                                          "no_image": "loc_no_image"}


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


def _question_template(record: EditRecord, templates: PromptTemplates) -> str:
    """How a VQA question about the edit's picture is wrapped: like the edit question in E-VQA,
    like the multimodal-locality question (the VQA template of both tasks) in E-IC."""
    return templates.edit if record.task == "vqa" else templates.m_loc


def portability_prompts(record: EditRecord, templates: PromptTemplates) -> list[Prompt]:
    """The record's one-hop questions (kind "port"), each with the edit's picture and the answer
    that follows from the edit as target; [] when the record has none.

    As VLKEB's own code does (VLKEB/VLKEB, branch edit_onehop, easyeditor/dataset/coco_caption.py):
    ``port_q`` with the edit's image, target ``port_a``, the question wrapped like the edit
    question. ``port_edit_q``/``port_edit_a`` do not enter this prompt: there they are a second,
    text-only edit applied before ``port_q`` is scored, which is the protocol's business.
    """
    template = _question_template(record, templates)
    return [Prompt(template.format(p["port_q"]), p["port_a"], record.image, PORTABILITY_KIND)
            for p in record.extras.get("port_new", [])]


def _field(record: EditRecord, name: str, field: str) -> Any:
    """``record.extras[field]``, or a DataError saying which set needs it."""
    if field not in record.extras:
        raise DataError(
            f"record {record.uid or '(no uid)'}: locality set '{name}' needs the field "
            f"'{field}', which this record lacks", field=field,
            hint="only the embedded mini world (GENERATOR_VERSION >= 5) writes the same_image and "
                 "similar_image fields; on real MMEdit/VLKEB data use the 'no_image' set only")
    return record.extras[field]


def locality_set_prompts(record: EditRecord, templates: PromptTemplates, name: str) -> list[Prompt]:
    """The prompts of locality set ``name`` (kind f"loc_{name}") for this record; raise
    mmke.errors.DataError naming the record uid, the set and the missing field, with a hint, when
    the record lacks what the set needs.

    - ``same_image``: the edit's picture with another question about it, of another kind and
      naming none of the edit's words (``loc_same_image_q``, true answer ``loc_same_image_a``).
      E-IC: a VQA question that avoids the recoloured object and both its colours.
    - ``similar_image``: the edit question ``src`` on another picture holding the object it names
      (``loc_similar_image``), true answer ``loc_similar_image_a``. E-IC: the caption prompt on a
      picture holding an object of the recoloured object's shape, target its true caption.
    - ``no_image``: ``src`` with no picture, target ``pred``; works for any record.

    Real data has no same-image field. Asking ``m_loc_q`` on the edit's picture was rejected as a
    fallback: ``m_loc_a`` answers it for another picture, and in VLKEB ``m_loc_q`` often asks what
    the edit changes ("Which city ... in the image?"), which is no locality test at all.
    """
    if name not in _LOCALITY_KINDS:
        raise ConfigError(f"unknown locality set {name!r}; expected one of "
                          f"{', '.join(LOCALITY_SETS)}")
    kind = _LOCALITY_KINDS[name]
    if name == "same_image":
        question = _field(record, name, "loc_same_image_q")
        target = _field(record, name, "loc_same_image_a")
        return [Prompt(_question_template(record, templates).format(question), target,
                       record.image, kind)]
    if name == "similar_image":
        image: LazyImage = _field(record, name, "loc_similar_image")
        target = _field(record, name, "loc_similar_image_a")
        return [Prompt(templates.edit.format(record.src), target, image, kind)]
    return [Prompt(templates.edit.format(record.src), record.pred, None, kind)]  # no_image


def port_edit_requests(record: EditRecord) -> list[EditRecord]:
    """VLKEB's second, text-only edit of its one-hop protocol (branch edit_onehop,
    MultimodalTrainer.edit_step): ``port_edit_q`` -> ``port_edit_a`` with no picture, applied after
    the main edit and before ``port_q`` is scored. One request per one-hop entry that has them.

    The request is the record with its edit fields replaced (an editor reads only ``src``,
    ``alt`` and ``image`` of what it edits), so nothing else of the record is exposed anew."""
    return [replace(record, src=p["port_edit_q"], rephrase=p["port_edit_q"], alt=p["port_edit_a"],
                    pred=p["port_edit_a"], image=None, image_rephrase=None,
                    uid=f"{record.uid}:port_edit", extras={})
            for p in record.extras.get("port_new", []) if "port_edit_q" in p and "port_edit_a" in p]
