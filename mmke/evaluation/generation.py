"""Greedy answers of the edited model, in batches, for generated-answer scoring.

Generation goes through ``Editor.generate`` (never the backbone directly) so prompt editors (IKE)
rewrite the prompts and routing editors (SERAC) answer through their own route, as they do for
teacher-forced scoring through ``Editor.forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mmke.data.record import Prompt


class Generates(Protocol):
    """An ``Editor`` (the edited model) or a ``Backbone`` (the unedited reference)."""

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 16) -> list[str]: ...


def generate_answers(editor: Generates, prompts: Sequence[Prompt], max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """The editor's greedy answer to each prompt, in order; one ``generate`` call per chunk of
    ``batch_size`` prompts. Targets are not read: the backbone encodes prompts without them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        chunk_answers = editor.generate(chunk, max_new_tokens=max_new_tokens)
        if len(chunk_answers) != len(chunk):
            raise RuntimeError(f"{type(editor).__name__}.generate returned {len(chunk_answers)} "
                               f"answers for {len(chunk)} prompts")
        answers.extend(chunk_answers)
    return answers
