"""Batched evaluation of edits: Reliability, T-Gen, M-Gen, T-Loc, M-Loc (and Port., the DE-VQA
locality sets, and greedy generated-answer scores when asked) per record.

All prompts of a group of records go through one padded forward per model state (and, in
``generate``/``both`` mode, one batched greedy generation). Locality references (the unedited
model's outputs on the locality prompts) are computed once per record, before any edit, and
reused by every later evaluation of that record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmke.backbones.base import Backbone, ForwardOutput, ModelBatch
from mmke.data.prompts import (PromptTemplates, edit_prompts, locality_set_prompts,
                               portability_prompts)
from mmke.data.record import EditRecord, Prompt
from mmke.editors.base import Editor
from mmke.evaluation import metrics
from mmke.evaluation.answers import answer_exact, answer_f1
from mmke.evaluation.generation import Generates, generate_answers
from mmke.evaluation.names import (METRIC_KEYS, PORT, f1_key, greedy_key, locality_set_key)
from mmke.evaluation.probes import ProbeSet, score_categories
from mmke.evaluation.scoring import Need, PromptOutput, score_prompts
from mmke.evaluation.spec import MetricSpec

#: The five metrics every run scores, in the papers' order.
METRICS = METRIC_KEYS
Part = Literal["main", "port"]


@dataclass(frozen=True)
class Item:
    """One scored prompt of a record: the metric it counts towards, and for locality prompts the
    top-k size of its comparison (0 for accuracy prompts)."""

    metric: str
    prompt: Prompt
    locality: bool = False
    k: int = 0


@dataclass
class LocalityReference:
    """The reference model's outputs on one record's locality items, in item order: teacher-forced
    outputs, and greedy answers when generation is scored."""

    outputs: list[PromptOutput] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Evaluator:
    """Scores records against a model state; counts its forwards (for the benchmark).

    ``probes``: the general-capability probe set (``eval.probes``), scored by ``probe``; its
    forwards are counted apart (``probe_forwards``), so ``forwards`` stays the edits' cost."""

    def __init__(self, spec: MetricSpec, templates: PromptTemplates,
                 probes: ProbeSet | None = None) -> None:
        self.spec = spec
        self.templates = templates
        self.probes = probes
        self.forwards = 0
        self.probe_forwards = 0
        self.generations = 0

    def items(self, record: EditRecord, part: Part = "main") -> list[Item]:
        """The prompts the spec scores for ``record``. ``main``: the five of MMEdit, its one-hop
        questions (when it has any, unless ``port_edit`` scores them after a second edit) and
        the locality sets the spec names. ``port``: the one-hop questions alone."""
        port = [Item(PORT, p) for p in portability_prompts(record, self.templates)]
        if part == "port":
            return port
        rel, t_gen, m_gen, t_loc, m_loc = edit_prompts(record, self.templates)
        t_k, m_k = self._k(self.spec.t_loc_k), self._k(self.spec.m_loc_k)
        items = [Item("rel", rel), Item("t_gen", t_gen), Item("m_gen", m_gen),
                 Item("t_loc", t_loc, True, t_k), Item("m_loc", m_loc, True, m_k)]
        items += [] if self.spec.port_edit else port
        for name in self.spec.locality_sets:
            for p in locality_set_prompts(record, self.templates, name):
                items.append(Item(locality_set_key(name), p, True,
                                  m_k if p.image is not None else t_k))
        return items

    def _k(self, k: int) -> int:
        return 0 if self.spec.locality == "kl" else k

    def _need(self, item: Item) -> Need:
        return Need(item.k, item.locality and self.spec.locality == "kl")

    def _score(self, forward: Callable[[ModelBatch], ForwardOutput], backbone: Backbone,
               items: list[Item], probe: bool = False) -> list[PromptOutput]:
        """Teacher-forced outputs of ``items``, ``batch_size`` prompts per forward."""
        out: list[PromptOutput] = []
        step = self.spec.batch_size
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            if probe:
                self.probe_forwards += 1
            else:
                self.forwards += 1
            out += score_prompts(forward, backbone, [i.prompt for i in chunk],
                                 [self._need(i) for i in chunk], self.spec.loc_positions)
        return out

    def probe(self, editor: Editor) -> list[dict]:
        """The probe set's rows (``mmke.evaluation.probes.PROBE_FIELDS``, one per category) on
        the model state ``editor`` holds now, read as ``evaluate`` reads it (prompt editors'
        rewrites, routing editors' forward); a probe is right on an exact match of its answer."""
        if self.probes is None:
            return []
        assert editor.backbone is not None
        prompts = editor.prepare_prompts(self.probes.prompts)
        outputs = self._score(editor.forward, editor.backbone,
                              [Item("probe", p) for p in prompts], probe=True)
        return score_categories(self.probes,
                                [metrics.exact_match(o.target_correct) == 1.0 for o in outputs])

    def _generate(self, model: Generates, prompts: list[Prompt]) -> list[str]:
        """Greedy answers of ``model`` to ``prompts``, ``batch_size`` prompts per generation."""
        step = self.spec.batch_size
        self.generations += -(-len(prompts) // step)
        return generate_answers(model, prompts, self.spec.max_new_tokens, step)

    def references(self, backbone: Backbone, records: Sequence[EditRecord]) -> list[LocalityReference]:
        """Locality references from ``backbone`` as it is now (call before editing)."""
        return self._references(backbone.forward, backbone, backbone, list, records)

    def references_now(self, editor: Editor, records: Sequence[EditRecord]) -> list[LocalityReference]:
        """Locality references from the model state ``editor`` holds now, read the way
        ``evaluate`` reads it (the online protocol's θ_{t-1}: M-ORE Eq. 17-18)."""
        assert editor.backbone is not None
        return self._references(editor.forward, editor.backbone, editor, editor.prepare_prompts,
                                records)

    def _references(self, forward: Callable[[ModelBatch], ForwardOutput], backbone: Backbone,
                    model: Generates, prepare: Callable[[list[Prompt]], list[Prompt]],
                    records: Sequence[EditRecord]) -> list[LocalityReference]:
        per_record = [[i for i in self.items(r) if i.locality] for r in records]
        flat = [i for items in per_record for i in items]
        prompts = prepare([i.prompt for i in flat])
        prepared = [Item(i.metric, p, i.locality, i.k) for i, p in zip(flat, prompts)]
        outputs = self._score(forward, backbone, prepared) if self.spec.teacher_forced else []
        answers: list[str] = []
        if self.spec.generated:  # unprepared: a prompt editor's generate rewrites them itself
            answers = self._generate(model, [i.prompt for i in flat])
        refs, start = [], 0
        for items in per_record:
            end = start + len(items)
            refs.append(LocalityReference(outputs[start:end], answers[start:end]))
            start = end
        return refs

    def evaluate(self, editor: Editor, records: Sequence[EditRecord],
                 refs: Sequence[LocalityReference], part: Part = "main") -> list[dict[str, float | None]]:
        """One row of metrics (fractions) per record, for the model state ``editor`` holds now;
        ``part`` as in ``items``."""
        if len(refs) != len(records):
            raise ValueError("one locality reference per record is needed")
        assert editor.backbone is not None
        per_record = [self.items(r, part) for r in records]
        flat = [i for items in per_record for i in items]
        prompts = editor.prepare_prompts([i.prompt for i in flat])
        prepared = [Item(i.metric, p, i.locality, i.k) for i, p in zip(flat, prompts)]
        outputs = self._score(editor.forward, editor.backbone, prepared) if self.spec.teacher_forced else []
        answers: list[str] = []
        if self.spec.generated:
            # the editor rewrites prompts itself (IKE), so it gets the unprepared ones
            answers = self._generate(editor, [i.prompt for i in flat])
        rows, start = [], 0
        for items, ref in zip(per_record, refs):
            end = start + len(items)
            rows.append(self._row(items, outputs[start:end], answers[start:end], ref))
            start = end
        return rows

    def _row(self, items: list[Item], outputs: list[PromptOutput], answers: list[str],
             ref: LocalityReference) -> dict[str, float | None]:
        scores: dict[str, list[float]] = {}
        n_loc = 0
        for pos, item in enumerate(items):
            if outputs:
                value = (self._locality(outputs[pos], ref.outputs[n_loc]) if item.locality
                         else self._accuracy(outputs[pos]))
                scores.setdefault(item.metric, []).append(value)
            if answers:
                if item.locality:
                    same = answer_exact(answers[pos], ref.answers[n_loc])
                    scores.setdefault(greedy_key(item.metric), []).append(same)
                else:
                    scores.setdefault(greedy_key(item.metric), []).append(
                        answer_exact(answers[pos], item.prompt.target))
                    scores.setdefault(f1_key(item.metric), []).append(
                        answer_f1(answers[pos], item.prompt.target))
            n_loc += item.locality
        row: dict[str, float | None] = {k: _mean(v) for k, v in scores.items()}
        if answers:
            row["rel_answer"] = answers[0]  # type: ignore[assignment]  # text, for inspection
        return row

    def _accuracy(self, out: PromptOutput) -> float:
        if self.spec.accuracy == "exact":
            return metrics.exact_match(out.target_correct)
        return metrics.token_accuracy(out.target_correct)

    def _locality(self, post: PromptOutput, ref: PromptOutput) -> float:
        if self.spec.locality == "kl":
            assert post.logprobs is not None and ref.logprobs is not None
            return metrics.exp_neg_kl(*self._aligned(post.logprobs, ref.logprobs))
        assert post.topk is not None and ref.topk is not None
        return metrics.topk_agreement(*self._aligned(post.topk, ref.topk))

    def _aligned(self, post: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-sequence conventions right-align outputs of prompts that a prompt editor (IKE)
        lengthened, as EasyEdit does; the answer-position conventions never differ in length."""
        if self.spec.loc_positions in ("easyedit", "text"):
            return metrics.align_right(post, ref)
        return post, ref
