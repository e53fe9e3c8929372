"""IKE's text format and its demonstrations, shared by the editor (``mmke.editors.ike``) and the
tiny recipes' in-context stage (``mmke.backbones.tiny.context``), so a tiny backbone learns to
read exactly the contexts IKE writes.

Zheng et al., "Can We Edit Factual Knowledge by In-Context Learning?" (EMNLP 2023), §3: a
demonstration is a new fact followed by a prompt and its answer, of three kinds:
- copy: the prompt is the fact's own prompt, answered with the new target;
- update: a paraphrase of it, answered with the new target (the fact generalises);
- retain: an unrelated prompt, answered with its own answer (the fact must not spill over).
The text is EasyEdit's (its IKE for multimodal models): each demonstration reads
``"New Fact: {prompt} {target}\\nPrompt: {query} {answer}\\n\\n"`` and the edited query
``"New Fact: {prompt} {target}\\nPrompt: {query}"``. In mmke the prompt texts are the task's
templated prompts (``PromptTemplates``), as every other editor reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mmke.data.prompts import PromptTemplates
from mmke.data.record import EditRecord
from mmke.errors import ConfigError

DemoKind = Literal["copy", "update", "retain"]
KINDS: tuple[DemoKind, ...] = ("copy", "update", "retain")


@dataclass(frozen=True)
class IKEFormat:
    """How facts, demonstrations and queries are written. ``line`` must hold ``{fact}`` and
    ``{prompt}``; ``separator`` ends each demonstration."""

    line: str = "New Fact: {fact}\nPrompt: {prompt}"
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        for field in ("{fact}", "{prompt}"):
            if field not in self.line:
                raise ConfigError(f"the IKE line {self.line!r} has no {field} field")

    @staticmethod
    def fact(edit_prompt: str, target: str) -> str:
        """The new fact: the templated edit prompt and its new target."""
        return f"{edit_prompt} {target}"

    def demonstration(self, fact: str, prompt: str, answer: str) -> str:
        """One demonstration: a fact, a prompt and the answer the model should give."""
        return self.line.format(fact=fact, prompt=f"{prompt} {answer}") + self.separator

    def query(self, fact: str, prompt: str) -> str:
        """The edited query: the fact, then the prompt to answer (its answer is scored)."""
        return self.line.format(fact=fact, prompt=prompt)


@dataclass(frozen=True)
class Demonstration:
    """One demonstration text, the train record (by index) it was built from, and its kind."""

    text: str
    record: int
    kind: DemoKind


def record_demonstrations(record: EditRecord, index: int, templates: PromptTemplates,
                          fmt: IKEFormat) -> list[Demonstration]:
    """The copy, update and retain demonstrations of one train record (EasyEdit's three
    sentences per training example)."""
    edit = templates.edit.format(record.src)
    fact = fmt.fact(edit, record.alt)
    return [
        Demonstration(fmt.demonstration(fact, edit, record.alt), index, "copy"),
        Demonstration(fmt.demonstration(fact, templates.edit.format(record.rephrase), record.alt),
                      index, "update"),
        Demonstration(fmt.demonstration(fact, templates.t_loc.format(record.loc), record.loc_ans),
                      index, "retain"),
    ]


def demonstration_bank(records: Sequence[EditRecord], templates: PromptTemplates,
                       fmt: IKEFormat) -> list[Demonstration]:
    """Every demonstration of ``records`` (three per record, in record order)."""
    return [d for i, r in enumerate(records) for d in record_demonstrations(r, i, templates, fmt)]


def edit_fact(record: EditRecord, templates: PromptTemplates, fmt: IKEFormat) -> str:
    """The new fact an edit of ``record`` writes into the context."""
    return fmt.fact(templates.edit.format(record.src), record.alt)
