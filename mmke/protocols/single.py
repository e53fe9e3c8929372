"""Single-edit protocol: for each record, edit, evaluate, restore (ODEdit/ASAM Table 1)."""

from __future__ import annotations

from collections.abc import Sequence

from mmke.data.record import EditRecord
from mmke.editors.base import Editor
from mmke.evaluation.evaluator import Evaluator
from mmke.protocols.base import EditRow, EditSink, Protocol


class SingleEdit(Protocol):
    def __init__(self, name: str = "single", T: int = 1) -> None:
        if T != 1:
            raise ValueError("the single protocol edits one record at a time: protocol.T must be 1 "
                             "(use protocol=sequential for T > 1)")
        super().__init__(name, T)

    def run(self, editor: Editor, evaluator: Evaluator, records: Sequence[EditRecord],
            sink: EditSink, progress: bool = True, *, start: int = 0) -> list[dict]:
        assert editor.backbone is not None
        refs = evaluator.references(editor.backbone, records)  # unedited model, once per record
        rows = []
        with self._bar(len(records), f"{editor.name}: single edits", progress) as bar:
            for i, (record, ref) in enumerate(zip(records, refs)):
                outcome = editor.edit([record])
                metrics, eval_s = None, 0.0
                if outcome.ok:
                    (metrics,), eval_s = self._timed(lambda: evaluator.evaluate(editor, [record], [ref]))
                editor.restore()
                row = EditRow(start + i, record.uid, outcome, eval_s, metrics).as_dict()
                sink(row)
                rows.append(row)
                bar.update()
        return rows
