"""Batched evaluation of edits: Reliability, T-Gen, M-Gen, T-Loc, M-Loc per record.

All prompts of a group of records go through one padded forward per model state. Locality
references (the unedited model's outputs on the locality prompts) are computed once per record,
before any edit, and reused by every later evaluation of that record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmke.backbones.base import Backbone, ForwardOutput, ModelBatch
from mmke.data.prompts import PromptTemplates, edit_prompts
from mmke.data.record import EditRecord
from mmke.editors.base import Editor
from mmke.evaluation import metrics
from mmke.evaluation.scoring import Need, PromptOutput, score_prompts
from mmke.evaluation.spec import MetricSpec

METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
PROMPTS_PER_RECORD = len(METRICS)


@dataclass
class LocalityReference:
    """The reference model's outputs on one record's two locality prompts."""

    t_loc: PromptOutput
    m_loc: PromptOutput


class Evaluator:
    """Scores records against a model state; counts its forwards (for the benchmark)."""

    def __init__(self, spec: MetricSpec, templates: PromptTemplates) -> None:
        self.spec = spec
        self.templates = templates
        self.forwards = 0

    @property
    def records_per_forward(self) -> int:
        return max(1, self.spec.batch_size // PROMPTS_PER_RECORD)

    def _needs(self) -> list[Need]:
        kl = self.spec.locality == "kl"
        t_k = 0 if kl else self.spec.t_loc_k
        m_k = 0 if kl else self.spec.m_loc_k
        return [Need(), Need(), Need(), Need(t_k, kl), Need(m_k, kl)]

    def _score(self, forward: Callable[[ModelBatch], ForwardOutput], backbone: Backbone,
               prompts: list, needs: list[Need]) -> list[PromptOutput]:
        self.forwards += 1
        return score_prompts(forward, backbone, prompts, needs, self.spec.loc_positions)

    def references(self, backbone: Backbone, records: Sequence[EditRecord]) -> list[LocalityReference]:
        """Locality references from ``backbone`` as it is now (call before editing)."""
        needs = self._needs()[3:]
        refs: list[LocalityReference] = []
        step = max(1, self.spec.batch_size // 2)
        for start in range(0, len(records), step):
            chunk = records[start:start + step]
            prompts = [p for r in chunk for p in edit_prompts(r, self.templates)[3:]]
            out = self._score(backbone.forward, backbone, prompts, needs * len(chunk))
            refs += [LocalityReference(out[2 * i], out[2 * i + 1]) for i in range(len(chunk))]
        return refs

    def evaluate(self, editor: Editor, records: Sequence[EditRecord],
                 refs: Sequence[LocalityReference]) -> list[dict[str, float]]:
        """One row of metrics per record, for the model state ``editor`` holds now."""
        if len(refs) != len(records):
            raise ValueError("one locality reference per record is needed")
        assert editor.backbone is not None
        rows: list[dict[str, float]] = []
        step = self.records_per_forward
        for start in range(0, len(records), step):
            chunk = records[start:start + step]
            prompts = editor.prepare_prompts(
                [p for r in chunk for p in edit_prompts(r, self.templates)])
            out = self._score(editor.forward, editor.backbone, prompts,
                              self._needs() * len(chunk))
            for i, ref in enumerate(refs[start:start + step]):
                rows.append(self._row(out[PROMPTS_PER_RECORD * i:PROMPTS_PER_RECORD * (i + 1)], ref))
        return rows

    def _row(self, out: list[PromptOutput], ref: LocalityReference) -> dict[str, float]:
        row = {name: self._accuracy(o) for name, o in zip(METRICS[:3], out[:3])}
        row["t_loc"] = self._locality(out[3], ref.t_loc)
        row["m_loc"] = self._locality(out[4], ref.m_loc)
        return row

    def _accuracy(self, out: PromptOutput) -> float:
        if self.spec.accuracy == "exact":
            return metrics.exact_match(out.target_correct)
        return metrics.token_accuracy(out.target_correct)

    def _locality(self, post: PromptOutput, ref: PromptOutput) -> float:
        if self.spec.locality == "kl":
            assert post.logprobs is not None and ref.logprobs is not None
            return metrics.exp_neg_kl(post.logprobs, ref.logprobs)
        assert post.topk is not None and ref.topk is not None
        return metrics.topk_agreement(post.topk, ref.topk)
