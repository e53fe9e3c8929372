"""A logger that logs nothing: the default, since the run folder already holds every result."""

from __future__ import annotations

from mmke.loggers.base import RunLogger


class NoneLogger(RunLogger):
    """Logs nothing. ``conf/logger/none.yaml``::

        _target_: mmke.loggers.none.NoneLogger
    """
