"""The no-op base logger, NoneLogger and CsvLogger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmke.loggers.base import RunLogger
from mmke.loggers.csv import CsvLogger
from mmke.loggers.none import NoneLogger


@pytest.mark.parametrize("cls", [RunLogger, NoneLogger])
def test_noop_loggers_write_nothing(cls: type[RunLogger], tmp_path: Path) -> None:
    logger = cls()
    logger.start({"seed": 0}, tmp_path)
    logger.log_edit(0, {"rel": 1.0})
    logger.log_summary({"rel": 1.0})
    logger.finish()
    assert list(tmp_path.iterdir()) == []


def test_csv_logger_files(tmp_path: Path) -> None:
    logger = CsvLogger(filename_prefix="ft_")
    logger.start({"seed": 0}, tmp_path)
    logger.log_edit(0, {"rel": np.float32(1.0), "uid": "a"})
    logger.log_edit(1, {"rel": 0.0, "uid": "b"})
    logger.log_summary({"rel": 0.5, "n_edits": 2})
    assert list(tmp_path.iterdir()) == []  # nothing until finish
    logger.finish()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft_edits.csv", "ft_summary.csv"]
    edits = pd.read_csv(tmp_path / "ft_edits.csv")
    assert list(edits.columns) == ["index", "rel", "uid"]
    assert edits["rel"].tolist() == [1.0, 0.0] and edits["index"].tolist() == [0, 1]
    summary = pd.read_csv(tmp_path / "ft_summary.csv")
    assert summary.to_dict("records") == [{"rel": 0.5, "n_edits": 2}]


def test_csv_logger_without_summary_or_edits(tmp_path: Path) -> None:
    logger = CsvLogger()
    logger.start({}, tmp_path)
    logger.finish()
    assert [p.name for p in tmp_path.iterdir()] == ["edits.csv"]
    assert (tmp_path / "edits.csv").read_text() == "index\n"


def test_csv_logger_finish_before_start_raises() -> None:
    with pytest.raises(RuntimeError, match="before start"):
        CsvLogger().finish()
