"""T-step sequential protocol: T edits one after another, then all T evaluated on the final model
(ODEdit Table 2, ASAM long-term tables). Records are cut into streams of T; the model is
restored between streams."""

from __future__ import annotations

from collections.abc import Sequence

from mmke.data.record import EditRecord
from mmke.editors.base import EditOutcome, Editor
from mmke.evaluation.evaluator import Evaluator
from mmke.protocols.base import EditRow, EditSink, ProbeSink, Protocol


class Sequential(Protocol):
    def __init__(self, name: str = "sequential", T: int = 5) -> None:
        super().__init__(name, T)

    def run(self, editor: Editor, evaluator: Evaluator, records: Sequence[EditRecord],
            sink: EditSink, progress: bool = True, *, start: int = 0,
            probe_sink: ProbeSink | None = None) -> list[dict]:
        assert editor.backbone is not None
        self._check_streams(records, evaluator)
        refs = evaluator.references(editor.backbone, records)
        self._probe_before(editor, evaluator, probe_sink, start)
        rows = []
        with self._bar(len(records), f"{editor.name}: sequential T={self.T}", progress) as bar:
            for first in range(0, len(records), self.T):
                chunk = records[first:first + self.T]
                outcomes: list[EditOutcome] = []
                for pos, record in enumerate(chunk):
                    outcomes.append(editor.edit([record]))
                    self._probe_after_edit(editor, evaluator, probe_sink,
                                           index=start + first + pos, position=pos)
                    bar.update()
                ok = [i for i, o in enumerate(outcomes) if o.ok]
                metrics, eval_s = self._timed(lambda: evaluator.evaluate(
                    editor, [chunk[i] for i in ok], [refs[first + i] for i in ok]))
                editor.restore()
                by_position = dict(zip(ok, metrics))
                for pos, (record, outcome) in enumerate(zip(chunk, outcomes)):
                    index = start + first + pos  # run-wide, as is the stream number
                    row = EditRow(index, record.uid, outcome, eval_s / max(1, len(ok)),
                                  by_position.get(pos),
                                  {"stream": (start + first) // self.T, "position": pos}).as_dict()
                    sink(row)
                    rows.append(row)
        return rows
