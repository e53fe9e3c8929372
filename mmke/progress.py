"""Progress bars that suit where they are drawn: live in a terminal, sparse in a log file.

In a file (CI, SLURM, ``nohup``) every redraw of a tqdm bar is a new line, so a pretraining bar
redrawn ten times a second fills thousands of lines. Off a terminal a bar here redraws at most
every ``LOG_INTERVAL`` seconds, and still prints its final state.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

#: Seconds between two redraws of a bar whose stream is not a terminal.
LOG_INTERVAL = 5.0


def redraw_interval(stream: TextIO | None = None) -> float | None:
    """``LOG_INTERVAL`` when ``stream`` (stderr by default) is not a terminal, else ``None``
    (tqdm's own 0.1 s)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        terminal = bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        terminal = False
    return None if terminal else LOG_INTERVAL


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, redrawing at most every ``LOG_INTERVAL`` seconds when its
    stream is not a terminal (an explicit ``mininterval`` wins)."""
    interval = redraw_interval(kwargs.get("file"))
    if interval is not None:
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, 10.0))
    return tqdm(iterable, **kwargs)
