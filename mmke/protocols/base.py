"""Protocols: the order of edits, evaluations and restores that defines an experiment."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from mmke.data.record import EditRecord
from mmke.editors.base import EditOutcome, Editor
from mmke.errors import ConfigError
from mmke.evaluation.evaluator import METRICS, Evaluator
from mmke.progress import progress_bar

EditSink = Callable[[dict], None]
#: Receives general-capability probe rows (``Protocol._probe``), one per category.
ProbeSink = Callable[[dict], None]


@dataclass
class EditRow:
    """One evaluated edit: what the editor did, what it cost, and its metrics (in percent, as the
    papers report them; None when the edit failed)."""

    index: int
    uid: str
    outcome: EditOutcome
    eval_s: float
    metrics: dict[str, float] | None
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        row = {"index": self.index, "uid": self.uid, **self.extra, "ok": self.outcome.ok,
               "steps": self.outcome.steps, "final_loss": self.outcome.final_loss,
               "edit_s": self.outcome.seconds, "eval_s": self.eval_s,
               "peak_mem_mb": self.outcome.peak_mem_mb,  # mmke.cost.MemoryMeter, MiB
               "incremental_mem_mb": self.outcome.incremental_mem_mb}
        for name in METRICS:  # present in every row, None for a failed edit
            row[name] = None
        for name, value in (self.metrics or {}).items():
            # metrics are fractions; generated answers kept for inspection are text
            row[name] = value if value is None or isinstance(value, str) else 100.0 * value
        if self.outcome.message:
            row["message"] = self.outcome.message
        return row


class Protocol(ABC):
    """Runs ``records`` through ``editor`` and ``evaluator``, emitting one row per edit.

    General-capability probes (``eval.probes``, M-ORE Figure 5) are taken here, for every
    protocol alike: once on the unedited model (``_probe_before``), and in a stream after every
    ``eval.probes_every`` edits and after its last edit, before the stream's final evaluation
    and restore (``_probe_after_edit``). The single protocol probes before editing only: it
    restores the model after each edit, so nothing accumulates along the run to track.
    """

    def __init__(self, name: str = "", T: int = 1) -> None:
        if T < 1:
            raise ValueError("protocol.T must be >= 1")
        self.name = name or type(self).__name__.lower()
        self.T = T

    @abstractmethod
    def run(self, editor: Editor, evaluator: Evaluator, records: Sequence[EditRecord],
            sink: EditSink, progress: bool = True, *, start: int = 0,
            probe_sink: ProbeSink | None = None) -> list[dict]:
        """Edit and evaluate ``records``, calling ``sink`` with each row as it is done, and
        ``probe_sink`` with each probe row when the evaluator has a probe set.

        ``start`` is the run-wide position of ``records[0]`` (non-zero for a process's shard of
        a multi-process run): rows carry run-wide indices, so gathered shards sort back into
        the order of one process.
        """

    def _probe_before(self, editor: Editor, evaluator: Evaluator, sink: ProbeSink | None,
                      start: int) -> None:
        """Probe the unedited model once per run: by the process holding the run's first
        record, so gathered shards hold one such row per category."""
        if start == 0:
            self._probe(editor, evaluator, sink, stream=None, edits=0, index=None)

    def _probe_after_edit(self, editor: Editor, evaluator: Evaluator, sink: ProbeSink | None,
                          *, index: int, position: int) -> None:
        """After the edit at run-wide ``index``, ``position`` within its stream: probe after
        every ``probes_every`` edits of the stream and after its last."""
        done, every = position + 1, evaluator.spec.probes_every
        if done == self.T or (every and done % every == 0):
            self._probe(editor, evaluator, sink, stream=index // self.T, edits=done, index=index)

    @staticmethod
    def _probe(editor: Editor, evaluator: Evaluator, sink: ProbeSink | None, *,
               stream: int | None, edits: int, index: int | None) -> None:
        if sink is None or evaluator.probes is None:
            return
        start = time.perf_counter()
        rows = evaluator.probe(editor)
        probe_s = time.perf_counter() - start
        for row in rows:
            # edits: how many edits of the stream the model holds (M-ORE Figure 5's x axis)
            sink({"stream": stream, "edits": edits, "index": index, **row, "probe_s": probe_s})

    def _check_streams(self, records: Sequence[EditRecord], evaluator: Evaluator) -> None:
        """Stream protocols take whole streams of T and score Port. without a second edit."""
        if len(records) % self.T:
            raise ConfigError(f"{len(records)} records do not split into streams of T={self.T}; "
                              "set n_edits to a multiple of protocol.T")
        if evaluator.spec.port_edit:
            raise ConfigError("eval.port_edit (VLKEB's one-hop protocol: a second edit per record "
                              f"before Port. is scored) needs protocol=single, not {self.name}")

    @staticmethod
    def _bar(total: int, desc: str, progress: bool) -> tqdm:
        return progress_bar(total=total, desc=desc, disable=not progress, unit="edit",
                            dynamic_ncols=True)

    @staticmethod
    def _timed(fn: Callable[[], list[dict[str, float]]]) -> tuple[list[dict[str, float]], float]:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start
