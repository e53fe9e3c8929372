"""Markdown, LaTeX and CSV exports of a built table parse back into the same grid."""

from __future__ import annotations

import io
import re

import pandas as pd
import pytest

from mmke.tables import build_table, display_frame, to_csv, to_latex, to_markdown, write_table
from mmke.tables.export import MISSING, _tex_label
from tests.tables.helpers import cell, frame, row_cells, run_row, write_published

FOUR = {"rel": 100.0, "gen": 99.5, "t_loc": 93.94, "m_loc": 64.79}


@pytest.fixture
def table(tmp_path) -> pd.DataFrame:
    pub = write_published(tmp_path, "odedit", [
        *row_cells("table1", "FT", FOUR),
        *row_cells("table1", "FT+ODEdit", FOUR, reg="odedit"),
        *row_cells("table1", r"w/o \mathcal{R}_{rel} | x", FOUR, editor="wise", task="caption"),
    ])
    runs = frame(*(run_row("ft", s, metrics={"rel": v, "t_gen": 80.0, "m_gen": 1.0,
                                             "t_loc": 70.0, "m_loc": 60.0})
                   for s, v in enumerate((90.0, 95.0, 100.0))),
                 *(run_row("ft", s, reg="odedit", metrics={"rel": v, "t_gen": 81.0 + s,
                                                           "m_gen": 1.0, "t_loc": 70.0,
                                                           "m_loc": 60.0})
                   for s, v in enumerate((91.0, 97.0, 99.0))))
    return build_table("odedit", "table1", runs, published=pub)


def markdown_grid(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_markdown_parses_into_a_regular_grid(table):
    text = to_markdown(table)
    grid = markdown_grid(text)
    header, rule, body = grid[0], grid[1], grid[2:]
    assert len(body) == 3 and all(len(r) == len(header) for r in grid)
    assert all(set(c) <= set("-:") for c in rule)
    assert header[:2] == ["Method", "Task"]
    assert {"Rel.", "Rel. ours", "Rel. p", "Gen.", "M-Loc. ours", "Ours from"} <= set(header)
    ft = dict(zip(header, body[0]))
    assert ft["Rel."] == "100.00" and ft["Rel. ours"] == "95.00 ± 5.00"
    assert ft["Rel. p"] == MISSING and ft["Ours from"] == "tiny_blip2 ×3 seeds"
    plus = dict(zip(header, body[1]))
    assert re.fullmatch(r"0\.\d{3}\*?|<0\.001\*?", plus["Rel. p"])
    missing = dict(zip(header, body[2]))
    assert missing["Rel. ours"] == MISSING and missing["Task"] == "E-IC"
    assert "\\|" in body[2][0]  # a '|' in a label is escaped, not a new cell
    assert "tiny models" in text.splitlines()[0]


def test_display_frame_matches_markdown(table):
    shown = display_frame(table)
    assert list(shown.columns) == markdown_grid(to_markdown(table))[0]
    assert shown.loc[0, "Gen. ours"] == "80.00 ± 0.00"


def test_latex_rows_have_as_many_cells_as_columns(table):
    text = to_latex(table)
    lines = text.splitlines()
    assert lines[1].startswith("\\begin{tabular}{") and lines[-1] == "\\end{tabular}"
    spec = re.match(r"\\begin\{tabular\}\{(\w+)\}", lines[1]).group(1)
    body = [line for line in lines if line.endswith("\\\\")]
    assert len(body) == 1 + 3
    for line in body:
        assert len(re.findall(r"(?<!\\)&", line)) == len(spec) - 1, line
    assert "95.00 $\\pm$ 5.00" in text and "tiny\\_blip2" in text
    assert "w/o $\\mathcal{R}_{rel}$" in text
    assert "\\toprule" in text and "\\bottomrule" in text


def test_csv_round_trips_every_number(table):
    back = pd.read_csv(io.StringIO(to_csv(table)))
    assert list(back.columns) == list(table.columns)
    numeric = [c for c in table.columns if c.split(".")[-1] in ("paper", "ours", "ours_std", "p")]
    pd.testing.assert_frame_equal(back[numeric].astype(float), table[numeric].astype(float),
                                  check_exact=False, rtol=1e-12)


def test_write_table_writes_three_formats(table, tmp_path):
    paths = write_table(table, tmp_path / "out")
    assert [p.name for p in paths] == ["odedit.table1.md", "odedit.table1.tex",
                                       "odedit.table1.csv"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_small_hyperparameters_are_not_rounded_to_zero(tmp_path):
    pub = write_published(tmp_path, "asam", [cell("table6", "eps", "rel", 0.001)])
    shown = display_frame(build_table("asam", "table6", frame(), published=pub))
    assert shown.loc[0, "Rel."] == "0.001"


@pytest.mark.parametrize("label, tex", [
    ("M-ORE $_1$", "M-ORE $_1$"),
    ("10^{-1}", "$10^{-1}$"),
    ("ASAM _{WISE}", "ASAM $_{WISE}$"),
    ("FT & co_x", "FT \\& co\\_x"),
])
def test_latex_labels(label, tex):
    assert _tex_label(label) == tex
