"""The papers' published numbers: ``experiments/published/<paper>.csv``, one tidy row per cell.

Schema (``PUBLISHED_COLUMNS``)::

    table,backbone,task,editor,reg,protocol,T,setting,row_label,metric,value,std,note

Empty key fields are read as empty strings, ``T`` as a nullable integer, ``value``/``std`` as
floats (NaN where empty). A table's layout is read from these rows: its rows are the distinct
(``ROW_KEYS``) keys in order of first appearance, its columns the distinct metrics.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from mmke.tables.errors import PublishedDataError, UnknownTableError

PUBLISHED_COLUMNS: tuple[str, ...] = ("table", "backbone", "task", "editor", "reg", "protocol",
                                      "T", "setting", "row_label", "metric", "value", "std",
                                      "note")
#: What identifies one row of a paper's table.
ROW_KEYS: tuple[str, ...] = ("backbone", "task", "editor", "reg", "protocol", "T", "setting",
                             "row_label")
_TEXT = ("table", "backbone", "task", "editor", "reg", "protocol", "setting", "row_label",
         "metric", "note")

PublishedLike = str | os.PathLike[str] | pd.DataFrame | None


def default_published_dir() -> Path:
    """``experiments/published`` of this checkout (beside the ``mmke`` package), else of the
    current folder."""
    beside = Path(__file__).resolve().parents[2] / "experiments" / "published"
    return beside if beside.is_dir() else Path("experiments") / "published"


def read_published(paper: str, published: PublishedLike = None) -> pd.DataFrame:
    """All published rows of ``paper``, typed and validated.

    ``published`` is a folder holding ``<paper>.csv`` (default: :func:`default_published_dir`),
    a CSV file, or an already loaded DataFrame in the same schema.
    """
    if isinstance(published, pd.DataFrame):
        return _typed(published.copy(), "<DataFrame>")
    path = Path(published) if published is not None else default_published_dir()
    if path.is_dir() or not path.suffix:
        path = path / f"{paper}.csv"
    if not path.is_file():
        raise PublishedDataError(f"no published numbers for {paper}: {path} does not exist")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return _typed(frame, str(path))


def available_tables(published: PublishedLike = None) -> list[str]:
    """``paper.table`` ids that have published rows, sorted (a folder with no CSVs gives [])."""
    if isinstance(published, pd.DataFrame):
        return sorted(set(published["table"].astype(str)))
    root = Path(published) if published is not None else default_published_dir()
    files = [root] if root.is_file() else sorted(root.glob("*.csv")) if root.is_dir() else []
    ids: set[str] = set()
    for file in files:
        frame = read_published(file.stem, file)
        ids.update(f"{file.stem}.{t}" for t in frame["table"])
    return sorted(ids, key=_natural)


def table_rows(paper: str, table: str, published: PublishedLike = None) -> pd.DataFrame:
    """The published rows of one table; ``UnknownTableError`` names the available tables."""
    try:
        frame = read_published(paper, published)
    except PublishedDataError as err:
        raise UnknownTableError(f"unknown table {paper}.{table}: {err}; available tables: "
                                f"{_available_text(published)}") from None
    rows = frame[frame["table"] == table]
    if rows.empty:
        known = sorted({f"{paper}.{t}" for t in frame["table"]}, key=_natural)
        raise UnknownTableError(f"unknown table {paper}.{table}; available tables: "
                                f"{', '.join(known) or '(none)'}")
    return rows.reset_index(drop=True)


def _available_text(published: PublishedLike) -> str:
    try:
        return ", ".join(available_tables(published)) or "(none)"
    except PublishedDataError:
        return "(none readable)"


def _typed(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in PUBLISHED_COLUMNS if c not in frame.columns]
    if missing:
        raise PublishedDataError(f"{source}: missing column(s) {missing}; expected "
                                 f"{','.join(PUBLISHED_COLUMNS)}")
    frame = frame[list(PUBLISHED_COLUMNS)].copy()
    for col in _TEXT:
        frame[col] = frame[col].fillna("").astype(str).str.strip()
    for col in ("backbone", "task", "editor", "reg", "protocol", "metric", "table"):
        frame[col] = frame[col].str.lower()
    frame["T"] = pd.to_numeric(_blank_to_na(frame["T"]), errors="coerce").astype("Int64")
    for col in ("value", "std"):
        text = _blank_to_na(frame[col])
        frame[col] = pd.to_numeric(text, errors="coerce").astype(float)
        bad = text.notna() & frame[col].isna()
        if bad.any():
            raise PublishedDataError(f"{source}: non-numeric {col} in row(s) "
                                     f"{[int(i) + 2 for i in frame.index[bad]]} (line numbers)")
    return frame


def _blank_to_na(column: pd.Series) -> pd.Series:
    return column.where(column.astype(str).str.strip().ne("") & column.notna())


def _natural(text: str) -> tuple:
    """Sort key that puts table2 before table10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))
