"""The logger contract: a run reports its config, each edit and its summary to a logger.

Loggers are side channels (CSV files, W&B, ...) next to the run folder that ``RunWriter``
writes; the run folder stays the authoritative result. Every method is a no-op here, so a
logger overrides only what it needs and the runner never has to check for None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunLogger:
    """Base class of all loggers. Subclasses take typed keyword settings in ``__init__`` and are
    built by Hydra from ``conf/logger/<name>.yaml`` (``_target_`` + those settings)."""

    def start(self, config: dict[str, Any], run_dir: Path, sweep: str | None = None) -> None:
        """Called once before the first edit with the resolved config, the run folder and the
        name of the sweep the run is a job of (None for a single run)."""

    def log_edit(self, index: int, row: dict[str, Any]) -> None:
        """Called after each edit with its position in the stream and its metrics."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Called once with the run's aggregated metrics."""

    def log_figure(self, name: str, figure: Any) -> None:
        """Called with a figure (a matplotlib ``Figure``) made from the run's results, if any;
        between ``log_summary`` and ``finish``."""

    def finish(self) -> None:
        """Called once at the end of the run; release resources and flush files here."""
