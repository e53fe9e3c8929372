"""Every figure function writes a PNG and a PDF from whatever runs exist, and says so clearly
when there is nothing to draw."""

from __future__ import annotations

import pandas as pd
import pytest

from mmke.tables import FIGURES, make_figure, more_figure5, more_figure7
from mmke.tables.errors import UnknownTableError
from mmke.tables.figures import SWEEPS, NothingToDraw
from mmke.tables.papers import setting_keys
from tests.tables.helpers import frame, run_row, write_run

SWEEP_VALUES = {"lambda": ["0.0001", "0.01", "adaptive"], "lr": [0.001, 0.005],
                "depth": [1, 3], "eps": [0.1, 0.001], "beta": [1, 10], "tau": [4],
                "rank": [128, 512]}


def assert_png_and_pdf(paths, stem: str) -> None:
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


def sweep_runs(fig_id: str) -> pd.DataFrame:
    spec = SWEEPS[fig_id]
    locality = "kl" if spec.paper == "more" else "topk"
    reg = "none" if spec.paper == "more" else spec.paper
    rows = []
    for param in spec.params:
        key = setting_keys(spec.paper, param)[0]
        for i, value in enumerate(SWEEP_VALUES[param]):
            for seed in (0, 1):
                rows.append(run_row("wise", seed, reg=reg,
                                    metrics={"rel": 90.0 + i, "t_gen": 80.0 + seed, "m_gen": 70.0,
                                             "t_loc": 60.0, "m_loc": 50.0 - i},
                                    config={key: value, "eval.locality": locality}))
    return frame(*rows)


@pytest.mark.parametrize("fig_id", sorted(SWEEPS))
def test_sweep_figures_write_png_and_pdf(fig_id, tmp_path):
    paths = FIGURES[fig_id](sweep_runs(fig_id), tmp_path)
    assert_png_and_pdf(paths, fig_id)


def test_a_sweep_with_one_value_still_draws(tmp_path):
    runs = frame(run_row("mend", 0, reg="odedit", config={"reg.tv_lambda": "adaptive"}))
    assert_png_and_pdf(make_figure("odedit.figure2", runs, tmp_path), "odedit.figure2")


def test_a_figure_row_without_runs_is_labelled_not_fatal(tmp_path):
    runs = frame(run_row("mend", 0, reg="odedit", config={"reg.tv_lr": 0.001}))  # no depth
    assert_png_and_pdf(make_figure("odedit.figure4", runs, tmp_path), "odedit.figure4")


@pytest.mark.parametrize("fig_id", sorted(FIGURES))
def test_no_runs_is_a_clear_message(fig_id, tmp_path):
    with pytest.warns(NothingToDraw, match=f"{fig_id}: nothing to draw"):
        assert make_figure(fig_id, frame(), tmp_path) == []
    assert not list(tmp_path.iterdir())


def test_runs_without_the_swept_setting_are_not_drawn(tmp_path):
    with pytest.warns(NothingToDraw, match="tv_lambda"):
        assert make_figure("odedit.figure2", frame(run_row("ft", 0)), tmp_path) == []


def edit_rows(memory: bool) -> pd.DataFrame:
    rows = []
    for editor, base in (("ft", 0.2), ("more", 0.05)):
        for t in range(12):
            row = dict(run_dir=f"runs/{editor}", backbone="tiny_llava", editor=editor,
                       reg="none", seed=0, index=t, edit_s=base * (3 if t == 0 else 1), ok=True)
            if memory:
                row["peak_mem_mb"] = 100.0 + (t if editor == "ft" else 0)
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("memory", [True, False])
def test_more_figure7_with_and_without_peak_memory(memory, tmp_path):
    assert_png_and_pdf(more_figure7(edit_rows(memory), tmp_path), "more.figure7")


def test_more_figure7_reads_edits_of_run_folders(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"ft{seed}", seed=seed,
                  edits=[{"edit_s": 0.01 * (i + 1)} for i in range(5)])
    assert_png_and_pdf(more_figure7(tmp_path / "runs", tmp_path / "out"), "more.figure7")


def test_more_figure5_draws_probe_accuracy_from_run_folders(tmp_path):
    for editor, drop in (("more", 0.0), ("ft", 10.0)):
        for seed in (0, 1):
            probes = [{"stream": None if t == 0 else 0, "edits": t, "index": t - 1 or None,
                       "category": c, "n": 10, "accuracy": 90.0 - drop * t}
                      for t in (0, 2, 4) for c in ("existence", "count", "position", "colour")]
            write_run(tmp_path / "runs" / f"{editor}{seed}", editor=editor, seed=seed,
                      probes=probes)
    write_run(tmp_path / "runs" / "no_probes")  # a run without probes.jsonl is left out
    assert_png_and_pdf(more_figure5(tmp_path / "runs", tmp_path / "out"), "more.figure5")


def test_unknown_figure(tmp_path):
    with pytest.raises(UnknownTableError, match="odedit.figure2"):
        make_figure("odedit.figure99", frame(), tmp_path)
