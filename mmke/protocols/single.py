"""Single-edit protocol: for each record, edit, evaluate, restore (ODEdit/ASAM Table 1)."""

from __future__ import annotations

from collections.abc import Sequence

from mmke.data.record import EditRecord
from mmke.editors.base import Editor
from mmke.data.prompts import port_edit_requests
from mmke.evaluation.evaluator import Evaluator, LocalityReference
from mmke.evaluation.names import PORT
from mmke.protocols.base import EditRow, EditSink, ProbeSink, Protocol


class SingleEdit(Protocol):
    def __init__(self, name: str = "single", T: int = 1) -> None:
        if T != 1:
            raise ValueError("the single protocol edits one record at a time: protocol.T must be 1 "
                             "(use protocol=sequential for T > 1)")
        super().__init__(name, T)

    def run(self, editor: Editor, evaluator: Evaluator, records: Sequence[EditRecord],
            sink: EditSink, progress: bool = True, *, start: int = 0,
            probe_sink: ProbeSink | None = None) -> list[dict]:
        assert editor.backbone is not None
        refs = evaluator.references(editor.backbone, records)  # unedited model, once per record
        self._probe_before(editor, evaluator, probe_sink, start)  # and never again: see Protocol
        rows = []
        with self._bar(len(records), f"{editor.name}: single edits", progress) as bar:
            for i, (record, ref) in enumerate(zip(records, refs)):
                outcome = editor.edit([record])
                metrics, eval_s = None, 0.0
                if outcome.ok:
                    (metrics,), eval_s = self._timed(lambda: evaluator.evaluate(editor, [record], [ref]))
                    if evaluator.spec.port_edit:
                        metrics.update(self._port_after_second_edit(editor, evaluator, record, ref))
                editor.restore()
                row = EditRow(start + i, record.uid, outcome, eval_s, metrics).as_dict()
                sink(row)
                rows.append(row)
                bar.update()
        return rows

    @staticmethod
    def _port_after_second_edit(editor: Editor, evaluator: Evaluator, record: EditRecord,
                                ref: LocalityReference) -> dict:
        """VLKEB's one-hop protocol (``eval.port_edit``): the record's ``port_edit_q`` ->
        ``port_edit_a`` edited in on top of the main edit, then Port. scored. A record without
        one-hop questions gets no Port.; a failed second edit gets Port. None."""
        requests = port_edit_requests(record)
        if not requests:
            return {}
        if not editor.edit(requests).ok:
            return {PORT: None}
        (port,) = evaluator.evaluate(editor, [record], [ref], part="port")
        return port
