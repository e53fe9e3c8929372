"""``python -m mmke.tables`` in a subprocess, on real run folders of the tiny default."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mmke.results import load_summaries
from mmke.runner import run
from mmke.tables import available_tables, build_table
from tests.conftest import ROOT, cache_dir, compose_config
from tests.tables.helpers import row_cells, write_published

FOUR = {"rel": 100.0, "gen": 100.0, "t_loc": 93.94, "m_loc": 64.79}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, pretrained) -> Path:
    """Four real runs: editor none and ft, seeds 0 and 1, four edits each."""
    root = tmp_path_factory.mktemp("runs")
    for editor in ("none", "ft"):
        for seed in (0, 1):
            cfg = compose_config([f"editor={editor}", f"seed={seed}", "n_edits=4"])
            run(cfg, root / f"{editor}_{seed}")
    return root


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return write_published(tmp_path_factory.mktemp("published"), "odedit", [
        *row_cells("table1", "Pre-edited", FOUR, editor="none"),
        *row_cells("table1", "FT", FOUR),
        *row_cells("table1", "WISE", FOUR, editor="wise"),
    ])


def tables_cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMKE_CACHE_DIR": str(cache_dir())}
    return subprocess.run([sys.executable, "-m", "mmke.tables", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_table_is_printed_and_written(real_runs, published, tmp_path):
    proc = tables_cli("odedit.table1", "--runs", real_runs, "--published", published,
                      "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| Method |" in proc.stdout and "tiny_blip2 ×2 seeds" in proc.stdout
    for fmt in ("md", "tex", "csv"):
        assert (tmp_path / f"odedit.table1.{fmt}").is_file()
    table = pd.read_csv(tmp_path / "odedit.table1.csv")
    assert list(table["row_label"]) == ["Pre-edited", "FT", "WISE"]
    assert list(table["n_runs"]) == [2, 2, 0]
    assert table["rel.ours"].iloc[:2].notna().all() and pd.isna(table["rel.ours"].iloc[2])
    summaries = load_summaries(real_runs)
    ft = summaries[summaries["editor"] == "ft"]
    assert table.loc[1, "rel.ours"] == pytest.approx(ft["rel"].mean())
    assert table.loc[1, "gen.ours"] == pytest.approx(ft["t_gen"].mean())  # Gen. = T-Gen.


def test_latex_and_csv_to_stdout(real_runs, published, tmp_path):
    proc = tables_cli("odedit.table1", "--runs", real_runs, "--published", published,
                      "--out", tmp_path, "--format", "tex")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("\\begin{tabular}")
    proc = tables_cli("odedit.table1", "--runs", real_runs, "--published", published,
                      "--out", tmp_path, "--format", "csv")
    assert len(pd.read_csv(io.StringIO(proc.stdout))) == 3


@pytest.mark.parametrize("args, needles", [
    (["odedit.table9"], ["unknown table odedit.table9", "available tables: odedit.table1"]),
    (["table1"], ["expected paper.table", "odedit.table1"]),
    (["figure", "odedit.figure9"], ["unknown figure odedit.figure9", "more.figure7"]),
])
def test_unknown_ids_exit_2_and_name_the_available_ones(args, needles, real_runs, published):
    proc = tables_cli(*args, "--runs", real_runs, *([] if args[0] == "figure" else
                                                     ["--published", published]))
    assert proc.returncode == 2
    for needle in needles:
        assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_folder_without_runs_exits_2(tmp_path, published):
    (tmp_path / "empty").mkdir()
    for args in (["odedit.table1", "--published", published], ["figure", "more.figure7"]):
        proc = tables_cli(*args, "--runs", tmp_path / "empty")
        assert proc.returncode == 2
        assert "no complete run folders" in proc.stderr and "Traceback" not in proc.stderr


def test_figures_from_real_runs(real_runs, tmp_path):
    proc = tables_cli("figure", "more.figure7", "--runs", real_runs, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "more.figure7.png").is_file() and (tmp_path / "more.figure7.pdf").is_file()
    proc = tables_cli("figure", "odedit.figure2", "--runs", real_runs, "--out", tmp_path)
    assert proc.returncode == 2
    assert "nothing to draw" in proc.stderr and "tv_lambda" in proc.stderr


def test_the_transcribed_odedit_table1_takes_the_tiny_runs(real_runs):
    """With the repository's own published numbers: the tiny runs fill BLIP2-OPT E-VQA rows."""
    if "odedit.table1" not in available_tables():
        pytest.skip("experiments/published/odedit.csv has no table1 yet")
    table = build_table("odedit", "table1", real_runs)
    filled = table[table["n_runs"] > 0]
    assert set(filled["row_label"]) == {"Pre-edited", "FT"}
    assert set(filled["backbone"]) == {"blip2"} and set(filled["task"]) == {"vqa"}
    assert filled["tiny"].all() and (filled["rel.n"] == 2).all()
