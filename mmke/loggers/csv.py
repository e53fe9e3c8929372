"""A logger that writes the run's edits and summary as CSV files for spreadsheets and quick looks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mmke.loggers.base import RunLogger
from mmke.results.atomic import atomic_write_text, to_jsonable


class CsvLogger(RunLogger):
    """Writes ``<prefix>edits.csv`` (one row per edit, with its ``index`` first) and
    ``<prefix>summary.csv`` (one row) into the run folder at ``finish``.

    Rows are kept in memory and written atomically at the end: a run has at most a few
    thousand edits, and a reader never sees a half-written CSV. ``conf/logger/csv.yaml``::

        _target_: mmke.loggers.csv.CsvLogger
        filename_prefix: ""
    """

    def __init__(self, filename_prefix: str = "") -> None:
        self.filename_prefix = filename_prefix
        self._run_dir: Path | None = None
        self._rows: list[dict[str, Any]] = []
        self._summary: dict[str, Any] | None = None

    def start(self, config: dict[str, Any], run_dir: Path, sweep: str | None = None) -> None:
        self._run_dir = Path(run_dir)
        self._rows, self._summary = [], None

    def log_edit(self, index: int, row: dict[str, Any]) -> None:
        # to_jsonable turns numpy/torch scalars into numbers instead of "tensor(0.5)" strings.
        self._rows.append({"index": index, **to_jsonable(dict(row))})

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._summary = to_jsonable(dict(summary))

    def finish(self) -> None:
        if self._run_dir is None:
            raise RuntimeError("CsvLogger.finish called before start")
        edits = pd.DataFrame(self._rows) if self._rows else pd.DataFrame(columns=["index"])
        self._write("edits.csv", edits)
        if self._summary is not None:  # no summary was logged: the run did not complete
            self._write("summary.csv", pd.DataFrame([self._summary]))

    def _write(self, name: str, frame: pd.DataFrame) -> None:
        assert self._run_dir is not None
        atomic_write_text(self._run_dir / f"{self.filename_prefix}{name}",
                          frame.to_csv(index=False, lineterminator="\n"))
