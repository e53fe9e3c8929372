"""Online protocol (M-ORE Appendix A.2, Eq. 14-18): streams of T edits, each scored right after
it is made, its locality against the model of the step before.

Within a stream of T records nothing is restored. For record t (θ_t: the model after its edit):
- Rel, T-Gen and M-Gen on θ_t (Eq. 14-16);
- T-Loc and M-Loc compare θ_t with θ_{t-1}, the model just before the edit (Eq. 17-18): its
  locality references are read from the editor before the edit, one batched forward (and, when
  generated answers are scored, one batched generation) per step. The convention is the eval
  spec's: exp(-KL) under ``eval=more``, top-k agreement under ``eval=mmedit``.
At the end of a stream every edit of it is scored again on the final model (retention: M-ORE
Figure 3d), stored as ``<metric>_final``; there locality compares with the unedited model, as
the sequential protocol does. Then the model is restored for the next stream.

The per-step scores are the papers' numbers: a Table 1 row "M-ORE_100" is the mean over
streams of T = 100 edits of each edit's score on its own θ_t.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mmke.data.record import EditRecord
from mmke.editors.base import EditOutcome, Editor
from mmke.evaluation.evaluator import Evaluator, LocalityReference
from mmke.evaluation.names import final_key
from mmke.protocols.base import EditRow, EditSink, ProbeSink, Protocol


class Online(Protocol):
    def __init__(self, name: str = "online", T: int = 100) -> None:
        super().__init__(name, T)

    def run(self, editor: Editor, evaluator: Evaluator, records: Sequence[EditRecord],
            sink: EditSink, progress: bool = True, *, start: int = 0,
            probe_sink: ProbeSink | None = None) -> list[dict]:
        assert editor.backbone is not None
        self._check_streams(records, evaluator)
        initial = evaluator.references(editor.backbone, records)  # θ_0, for the final scores
        self._probe_before(editor, evaluator, probe_sink, start)
        rows = []
        with self._bar(len(records), f"{editor.name}: online T={self.T}", progress) as bar:
            for first in range(0, len(records), self.T):
                stream = records[first:first + self.T]
                rows += self._stream(editor, evaluator, stream, initial[first:first + self.T],
                                     start + first, sink, bar.update, probe_sink)
        return rows

    def _stream(self, editor: Editor, evaluator: Evaluator, stream: Sequence[EditRecord],
                initial: Sequence[LocalityReference], first: int, sink: EditSink,
                advance: Callable[[], object], probe_sink: ProbeSink | None = None) -> list[dict]:
        """Edit and score one stream; ``first`` is the run-wide index of its first record."""
        outcomes: list[EditOutcome] = []
        step: list[dict | None] = []
        eval_s: list[float] = []
        for pos, record in enumerate(stream):
            (before,), ref_s = self._timed(lambda: evaluator.references_now(editor, [record]))
            outcome = editor.edit([record])
            metrics, score_s = None, 0.0
            if outcome.ok:
                (metrics,), score_s = self._timed(
                    lambda: evaluator.evaluate(editor, [record], [before]))
            outcomes.append(outcome)
            step.append(metrics)
            eval_s.append(ref_s + score_s)
            self._probe_after_edit(editor, evaluator, probe_sink, index=first + pos, position=pos)
            advance()
        ok = [i for i, o in enumerate(outcomes) if o.ok]
        final, final_s = self._timed(lambda: evaluator.evaluate(
            editor, [stream[i] for i in ok], [initial[i] for i in ok]))
        editor.restore()
        at_end = dict(zip(ok, final))
        rows = []
        for pos, (record, outcome) in enumerate(zip(stream, outcomes)):
            metrics = step[pos]
            if metrics is not None:
                metrics = {**metrics, **{final_key(k): v for k, v in at_end[pos].items()}}
            row = EditRow(first + pos, record.uid, outcome,
                          eval_s[pos] + final_s / max(1, len(ok)), metrics,
                          {"stream": first // self.T, "position": pos}).as_dict()
            sink(row)
            rows.append(row)
        return rows
