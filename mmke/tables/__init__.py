"""The papers' tables and figures, built from run folders.

    from mmke.tables import build_table, to_markdown, make_figure
    table = build_table("odedit", "table1", "outputs/multirun")   # ours beside the paper's
    print(to_markdown(table))
    make_figure("odedit.figure2", "outputs/multirun", "outputs/figures")

Column definitions (which metric keys a paper's columns are, ``gen``/``avg``) live in
``mmke.evaluation.names``; significance claims and the setting -> config-key mapping in
``mmke.tables.papers``; the published numbers in ``experiments/published/<paper>.csv``.
Command line: ``python -m mmke.tables --help``.
"""

from mmke.tables.build import build_table, runs_table
from mmke.tables.errors import NoRunsError, PublishedDataError, UnknownTableError
from mmke.tables.export import (caption, display_frame, render, to_csv, to_latex, to_markdown,
                                write_table)
from mmke.tables.figures import FIGURES, make_figure, more_figure5, more_figure7, sweep_figure
from mmke.tables.matching import backbone_family
from mmke.tables.papers import PAPERS, setting_keys
from mmke.tables.published import available_tables, read_published
from mmke.tables.runs import load_table_runs

__all__ = [
    "FIGURES", "PAPERS", "NoRunsError", "PublishedDataError", "UnknownTableError",
    "available_tables", "backbone_family", "build_table", "caption", "display_frame",
    "load_table_runs", "make_figure", "more_figure5", "more_figure7", "read_published", "render",
    "runs_table",
    "setting_keys", "sweep_figure", "to_csv", "to_latex", "to_markdown", "write_table",
]
