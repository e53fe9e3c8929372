"""Progress bars: live in a terminal, sparse in a log file (CI, SLURM, nohup)."""

import io

from mmke.progress import LOG_INTERVAL, progress_bar, redraw_interval


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Detached(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def redraws(text: str) -> int:
    """How many times a bar was drawn: tqdm starts each redraw with a carriage return."""
    return text.count("\r")


def test_off_a_terminal_a_bar_redraws_every_few_seconds_at_most():
    assert redraw_interval(io.StringIO()) == LOG_INTERVAL
    assert redraw_interval(Detached()) == LOG_INTERVAL
    assert 1.0 <= LOG_INTERVAL <= 10.0
    log = io.StringIO()
    for _ in progress_bar(range(20_000), desc="pretrain", file=log):
        pass
    # 20,000 steps take milliseconds: the first draw and the final state, not one line a step
    assert redraws(log.getvalue()) <= 3, log.getvalue()[:500]
    assert "20000/20000" in log.getvalue()


def test_in_a_terminal_a_bar_keeps_tqdms_own_rate():
    assert redraw_interval(Terminal()) is None
    bar = progress_bar(range(3), file=Terminal())
    assert bar.mininterval == 0.1
    bar.close()


def test_an_explicit_interval_wins():
    bar = progress_bar(range(3), file=io.StringIO(), mininterval=0.5)
    assert bar.mininterval == 0.5
    bar.close()


def test_a_disabled_bar_draws_nothing():
    log = io.StringIO()
    for _ in progress_bar(range(100), file=log, disable=True):
        pass
    assert log.getvalue() == ""
