"""Runs whose summary says ``leaky: true`` (a regularizer setting let the edits see the evaluated
record's own prompts) are never pooled with the clean runs of a row: tables give them rows of
their own, marked "(leaky: …)" with a footnote and a warning, and figures lines of their own."""

from __future__ import annotations

import math

import pytest
from matplotlib.axes import Axes

from mmke.tables import build_table, make_figure, runs_table, to_latex, to_markdown
from mmke.tables.export import LEAKY_NOTE
from mmke.tables.runs import is_leaky, leaked_text, load_table_runs
from tests.tables.helpers import frame, row_cells, run_row, write_published, write_run

FOUR = {"rel": 100.0, "gen": 99.0, "t_loc": 93.94, "m_loc": 64.79}


@pytest.fixture
def published(tmp_path):
    return write_published(tmp_path / "published", "odedit", [
        *row_cells("table1", "FT", FOUR),
        *row_cells("table1", "FT+ODEdit", FOUR, reg="odedit"),
    ])


def odedit_runs(t_gen: float, leaked: list[str] | None = None, seeds=(0, 1, 2)) -> list[dict]:
    flag = {"leaky": True, "leaked": leaked} if leaked else {"leaky": False}
    return [run_row("ft", seed, reg="odedit", metrics={"rel": 100.0, "t_gen": t_gen + seed,
                                                       "m_gen": 50.0, "t_loc": 90.0,
                                                       "m_loc": 80.0}, **flag)
            for seed in seeds]


def rows_by_label(table) -> dict:
    return {r["row_label"]: r for _, r in table.iterrows()}


def test_leaky_runs_get_a_marked_row_of_their_own(published):
    runs = frame(*odedit_runs(60.0), *odedit_runs(95.0, ["t_gen"]))
    with pytest.warns(UserWarning, match=r"leaky run\(s\).*t_gen.*not pooled"):
        table = build_table("odedit", "table1", runs, published=published)
    assert list(table["row_label"]) == ["FT", "FT+ODEdit", "FT+ODEdit (leaky: t_gen)"]
    rows = rows_by_label(table)
    clean, leaky = rows["FT+ODEdit"], rows["FT+ODEdit (leaky: t_gen)"]
    assert clean["gen.ours"] == pytest.approx(61.0) and clean["leaked"] == ""
    assert leaky["gen.ours"] == pytest.approx(96.0) and leaky["leaked"] == "t_gen"
    assert clean["n_runs"] == 3 and leaky["n_runs"] == 3
    assert leaky["gen.paper"] == clean["gen.paper"] == 99.0  # the paper's number beside both
    assert leaky["reg"] == "odedit" and table.attrs["leaky"] is True


def test_different_leaks_are_not_pooled_either(published):
    runs = frame(*odedit_runs(60.0, ["t_gen"]), *odedit_runs(70.0, ["t_loc", "m_loc"]))
    with pytest.warns(UserWarning, match="leaky"):
        table = build_table("odedit", "table1", runs, published=published)
    rows = rows_by_label(table)
    assert rows["FT+ODEdit"]["n_runs"] == 0 and math.isnan(rows["FT+ODEdit"]["gen.ours"])
    assert rows["FT+ODEdit (leaky: t_gen)"]["gen.ours"] == pytest.approx(61.0)
    assert rows["FT+ODEdit (leaky: t_loc,m_loc)"]["gen.ours"] == pytest.approx(71.0)


def test_the_p_value_of_a_leaky_row_pairs_with_clean_baselines(published):
    baseline = [run_row("ft", s, metrics={"rel": 100.0, "t_gen": 50.0 + s, "m_gen": 50.0,
                                          "t_loc": 90.0, "m_loc": 80.0}) for s in (0, 1, 2)]
    runs = frame(*baseline, *odedit_runs(60.0), *odedit_runs(95.0, ["t_gen"]))
    with pytest.warns(UserWarning, match="leaky"):
        table = build_table("odedit", "table1", runs, published=published)
    rows = rows_by_label(table)
    assert rows["FT+ODEdit (leaky: t_gen)"]["gen.p"] < 0.05
    assert not math.isnan(rows["FT+ODEdit"]["gen.p"])


def test_a_table_without_leaky_runs_is_unchanged(published):
    table = build_table("odedit", "table1", frame(*odedit_runs(60.0)), published=published)
    assert list(table["row_label"]) == ["FT", "FT+ODEdit"]
    assert table.attrs["leaky"] is False
    assert "leaky" not in to_markdown(table)


def test_markdown_and_latex_carry_the_marker_and_the_footnote(published):
    runs = frame(*odedit_runs(60.0), *odedit_runs(95.0, ["t_gen", "m_gen"]))
    with pytest.warns(UserWarning, match="leaky"):
        table = build_table("odedit", "table1", runs, published=published)
    md, tex = to_markdown(table), to_latex(table)
    assert "| FT+ODEdit (leaky: t_gen,m_gen) |" in md and LEAKY_NOTE in md
    assert r"FT+ODEdit (leaky: t\_gen,m\_gen)" in tex and LEAKY_NOTE in tex


def test_runs_table_labels_leaky_runs_and_adds_no_empty_clean_row():
    runs = frame(*odedit_runs(95.0, ["t_gen"]),
                 run_row("ft", 0, metrics={"rel": 100.0, "t_gen": 50.0}))
    with pytest.warns(UserWarning, match="leaky"):
        table = runs_table("odedit", runs)
    assert sorted(table["row_label"]) == ["ft", "ft+odedit (leaky: t_gen)"]


def test_the_flag_is_read_from_run_folders(tmp_path):
    write_run(tmp_path / "runs" / "clean", reg="odedit")
    write_run(tmp_path / "runs" / "leaky", reg="odedit",
              summary={"leaky": True, "leaked": ["t_loc", "m_loc"]})
    runs = load_table_runs(tmp_path / "runs")
    flags = {str(r["run_dir"]).rsplit("/", 1)[-1]: (is_leaky(r), leaked_text(r))
             for _, r in runs.iterrows()}
    assert flags == {"clean": (False, ""), "leaky": (True, "t_loc,m_loc")}


def test_a_sweep_figure_draws_leaky_runs_as_their_own_line(tmp_path, monkeypatch):
    labels: list[str] = []
    real = Axes.errorbar

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    runs = frame(*(dict(r, **{"config.reg.tv_lambda": "adaptive"})
                   for r in [*odedit_runs(60.0), *odedit_runs(95.0, ["t_gen"])]))
    make_figure("odedit.figure2", runs, tmp_path)
    assert set(labels) == {"odedit", "odedit (leaky: t_gen)"}
