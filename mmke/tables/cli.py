"""Command line: ``python -m mmke.tables ...``.

    python -m mmke.tables odedit.table1 --runs outputs/multirun [--published experiments/published]
                          [--out outputs/tables] [--format md|tex|csv]
                          [--significance auto|all|none]
    python -m mmke.tables figure odedit.figure2 --runs outputs/multirun [--out outputs/figures]
    python -m mmke.tables list [--published experiments/published]

A table is printed in ``--format`` and written to ``--out`` in all three formats
(``<paper>.<table>.md/.tex/.csv``); a figure is written as PNG and PDF. Errors a user can act
on (an unknown table or figure, a folder without runs, a malformed published CSV) are printed
without a traceback and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from mmke.errors import MMKEError
from mmke.tables.build import ANSWERS, build_table
from mmke.tables.errors import NoRunsError, UnknownTableError
from mmke.tables.export import FORMATS, render, write_table
from mmke.tables.figures import FIGURES, NothingToDraw, make_figure
from mmke.tables.papers import PAPERS
from mmke.tables.published import available_tables, default_published_dir, table_rows
from mmke.tables.runs import load_table_runs

_SIGNIFICANCE = {"auto": None, "all": True, "none": False}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "figure":
            return _figure(args[1:])
        if args and args[0] == "list":
            return _list(args[1:])
        return _table(args)
    except (MMKEError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _table(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmke.tables",
        description="Build one of the papers' tables from run folders, ours beside the "
                    "published numbers. Other commands: 'figure <id>', 'list'.")
    parser.add_argument("table", help="paper.table, e.g. odedit.table1 ('list' shows all)")
    parser.add_argument("--runs", action="append", required=True,
                        help="folder holding run folders (repeatable)")
    parser.add_argument("--published", default=None,
                        help="folder of <paper>.csv published numbers "
                             f"(default: {default_published_dir()})")
    parser.add_argument("--out", default="outputs/tables", help="folder for .md/.tex/.csv")
    parser.add_argument("--format", choices=FORMATS, default="md", help="what to print")
    parser.add_argument("--significance", choices=tuple(_SIGNIFICANCE), default="auto",
                        help="auto: t-tests where the paper claims significance; all: every "
                             "row with a regularizer; none: no tests")
    parser.add_argument("--answers", choices=ANSWERS, default="teacher_forced",
                        help="teacher_forced: the papers' metrics; greedy: their greedy "
                             "generated-answer counterparts (runs with eval.mode=generate or "
                             "both); both: side by side")
    parser.add_argument("--digits", type=int, default=2)
    args = parser.parse_args(argv)
    paper, table = _split(args.table, "table", available_tables(args.published))
    if paper not in PAPERS:
        raise UnknownTableError(f"unknown table {args.table}: unknown paper {paper!r}; "
                                f"available tables: {', '.join(available_tables(args.published))}")
    table_rows(paper, table, args.published)  # an unknown table fails before runs are read
    runs = load_table_runs(args.runs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = build_table(paper, table, runs, published=args.published,
                            significance=_SIGNIFICANCE[args.significance],
                            answers=args.answers)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(render(built, args.format, args.digits), end="")
    for path in write_table(built, args.out, digits=args.digits):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _figure(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmke.tables figure",
                                     description="Draw one of the papers' figures from run "
                                                 "folders (PNG and PDF).")
    parser.add_argument("figure", help=f"one of: {', '.join(FIGURES)}")
    parser.add_argument("--runs", action="append", required=True,
                        help="folder holding run folders (repeatable)")
    parser.add_argument("--out", default="outputs/figures", help="folder for .png/.pdf")
    args = parser.parse_args(argv)
    if args.figure not in FIGURES:
        raise UnknownTableError(f"unknown figure {args.figure}; available figures: "
                                f"{', '.join(FIGURES)}")
    runs = load_table_runs(args.runs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = make_figure(args.figure, runs, args.out)
    nothing = [w for w in caught if issubclass(w.category, NothingToDraw)]
    if nothing:
        raise NoRunsError(f"{nothing[0].message} (runs: {', '.join(args.runs)})")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _list(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmke.tables list",
                                     description="List the tables and figures.")
    parser.add_argument("--published", default=None)
    args = parser.parse_args(argv)
    tables = available_tables(args.published)
    print("tables:  " + (", ".join(tables) or "(no published CSVs found)"))
    print("figures: " + ", ".join(FIGURES))
    return 0


def _split(ident: str, kind: str, available: list[str]) -> tuple[str, str]:
    paper, dot, table = ident.partition(".")
    if not dot or not paper or not table:
        raise UnknownTableError(f"unknown {kind} {ident!r}: expected paper.{kind}, e.g. "
                                f"odedit.table1; available tables: "
                                f"{', '.join(available) or '(none)'}")
    return paper.lower(), table.lower()
