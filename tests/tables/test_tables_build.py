"""build_table on hand-made runs and published CSVs: exact numbers, missing cells, t-tests,
backbone families, settings, protocols and the papers' derived columns."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mmke.evaluation.names import DERIVED_METRICS, column_label
from mmke.tables import UnknownTableError, build_table, runs_table
from mmke.tables.matching import backbone_family, is_tiny, parse_setting, protocol_key, same_value
from tests.tables.helpers import cell, frame, row_cells, run_row, write_published, write_run

FOUR = {"rel": 100.0, "gen": 99.0, "t_loc": 93.94, "m_loc": 64.79}


@pytest.fixture
def published(tmp_path):
    rows = [
        *row_cells("table1", "Pre-edited", FOUR, editor="none"),
        *row_cells("table1", "FT", FOUR),
        *row_cells("table1", "FT+ODEdit", FOUR, reg="odedit"),
        *row_cells("table1", "WISE", FOUR, editor="wise"),
        *row_cells("table1", "FT", FOUR, backbone="minigpt4"),
        *row_cells("table1", "FT", FOUR, task="caption"),
        cell("table2", "FT", "rel", 44.5, protocol="sequential", T=5),
        cell("table2", "FT", "rel", 28.5, protocol="sequential", T=10),
        cell("table2", "FT+ODEdit", "rel", 49.42, reg="odedit", protocol="sequential", T=5),
    ]
    return write_published(tmp_path / "published", "odedit", rows)


def ft_runs(values=(90.0, 95.0, 100.0), **keys) -> list[dict]:
    return [run_row("ft", seed, metrics={"rel": v, "t_gen": v - 10, "m_gen": 1.0, "t_loc": 80.0,
                                         "m_loc": 70.0}, **keys)
            for seed, v in enumerate(values)]


def row(table: pd.DataFrame, label: str, **keys) -> pd.Series:
    mask = table["row_label"] == label
    for key, value in keys.items():
        mask &= table[key] == value
    assert mask.sum() == 1, (label, keys)
    return table[mask].iloc[0]


def test_mean_and_sample_std_over_seeds_are_exact(published):
    table = build_table("odedit", "table1", frame(*ft_runs()), published=published)
    ft = row(table, "FT", backbone="blip2", task="vqa")
    assert ft["rel.ours"] == pytest.approx(95.0)
    assert ft["rel.ours_std"] == pytest.approx(5.0)  # ddof=1 over 90, 95, 100
    assert ft["rel.n"] == 3
    assert ft["gen.ours"] == pytest.approx(85.0)     # Gen. is our T-Gen.
    assert ft["rel.paper"] == 100.0 and ft["t_loc.paper"] == pytest.approx(93.94)
    assert ft["seeds"] == "0,1,2" and ft["n_runs"] == 3


def test_runs_sharing_a_seed_are_averaged_first(published):
    runs = frame(*ft_runs((90.0, 100.0)), run_row("ft", 0, metrics={"rel": 80.0}))
    ft = row(build_table("odedit", "table1", runs, published=published), "FT", task="vqa",
             backbone="blip2")
    assert ft["rel.ours"] == pytest.approx(((90 + 80) / 2 + 100) / 2)
    assert ft["rel.n"] == 2


def test_missing_stays_missing_never_zero(published):
    runs = frame(run_row("ft", 0, metrics={"rel": 90.0, "t_gen": 80.0}))  # no locality stored
    table = build_table("odedit", "table1", runs, published=published)
    ft = row(table, "FT", backbone="blip2", task="vqa")
    assert math.isnan(ft["t_loc.ours"]) and ft["t_loc.n"] == 0
    assert math.isnan(ft["rel.ours_std"])  # one seed: no std
    wise = row(table, "WISE")
    assert wise["n_runs"] == 0 and wise["ours_backbone"] == ""
    assert all(math.isnan(wise[f"{m}.ours"]) for m in FOUR)
    assert (table.filter(like=".ours").fillna(-1) != 0).all().all()


def test_single_seed_row_has_nan_std_and_paper_cells_keep_their_std(tmp_path):
    pub = write_published(tmp_path, "asam", [cell("table1", "FT", "rel", 99.0, std=0.5)])
    table = build_table("asam", "table1", frame(run_row("ft", 3)), published=pub)
    assert table.loc[0, "rel.paper_std"] == 0.5
    assert math.isnan(table.loc[0, "rel.ours_std"]) and table.loc[0, "rel.ours"] == 50.0


def paired_frame() -> tuple[pd.DataFrame, dict, dict]:
    treated = {0: 91.0, 1: 94.5, 2: 93.0, 3: 97.25, 4: 60.0}
    base = {0: 90.0, 1: 92.0, 2: 93.5, 3: 95.0, 5: 10.0}
    rows = [run_row("ft", s, reg="odedit", metrics={"rel": v, "t_gen": v, "m_gen": v,
                                                     "t_loc": 99.0, "m_loc": v / 2})
            for s, v in treated.items()]
    rows += [run_row("ft", s, metrics={"rel": v, "t_gen": v, "m_gen": v, "t_loc": 99.0,
                                       "m_loc": v / 3})
             for s, v in base.items()]
    return frame(*rows), treated, base


def test_p_value_is_scipys_paired_ttest_over_common_seeds(published):
    runs, treated, base = paired_frame()
    table = build_table("odedit", "table1", runs, published=published)
    plus = row(table, "FT+ODEdit")
    common = [0, 1, 2, 3]  # seed 4 has no baseline, seed 5 no treated run
    expected = stats.ttest_rel([treated[s] for s in common], [base[s] for s in common]).pvalue
    assert plus["rel.p"] == pytest.approx(expected, rel=1e-12)
    expected_mloc = stats.ttest_rel([treated[s] / 2 for s in common],
                                    [base[s] / 3 for s in common]).pvalue
    assert plus["m_loc.p"] == pytest.approx(expected_mloc, rel=1e-12)
    assert math.isnan(plus["t_loc.p"])          # identical values: scipy gives no p-value
    assert math.isnan(row(table, "FT", backbone="blip2", task="vqa")["rel.p"])  # no reg: no test


def test_p_value_is_nan_below_two_paired_seeds(published):
    runs = frame(run_row("ft", 0, reg="odedit", metrics={"rel": 90.0}),
                 run_row("ft", 0, metrics={"rel": 80.0}), run_row("ft", 1, metrics={"rel": 85.0}))
    plus = row(build_table("odedit", "table1", runs, published=published), "FT+ODEdit")
    assert math.isnan(plus["rel.p"])


def test_p_values_only_where_the_paper_claims_significance(published):
    runs, _, _ = paired_frame()
    table2 = build_table("odedit", "table2", runs, published=published)
    assert not any(c.endswith(".p") for c in table2.columns)
    assert table2.attrs["alpha"] is None
    forced = build_table("odedit", "table2", runs, published=published, significance=True)
    assert "rel.p" in forced.columns and forced.attrs["alpha"] == 0.05
    off = build_table("odedit", "table1", runs, published=published, significance=False)
    assert not any(c.endswith(".p") for c in off.columns)


def test_tiny_backbones_stand_in_for_their_family_and_say_so(published):
    runs = frame(*ft_runs(), run_row("ft", 0, backbone="blip2", metrics={"rel": 10.0}))
    table = build_table("odedit", "table1", runs, published=published)
    ft = row(table, "FT", backbone="blip2", task="vqa")
    assert ft["ours_backbone"] == "blip2,tiny_blip2" and ft["tiny"] is True
    assert ft["n_runs"] == 4
    assert row(table, "FT", backbone="minigpt4")["n_runs"] == 0
    assert row(table, "FT", task="caption")["n_runs"] == 0
    assert table.attrs["tiny"] is True


@pytest.mark.parametrize("name, family", [
    ("tiny_blip2", "blip2"), ("blip2", "blip2"), ("tiny_llava", "llava"), ("llava", "llava"),
    ("minigpt4", "minigpt4"), ("tiny_minigpt4", "minigpt4"), ("qwen2vl", "qwen2vl"),
    ("Qwen2-VL", "qwen2vl"), ("tiny_qwen2vl", "qwen2vl"), ("LLaVA-v1.5", "llava"),
])
def test_backbone_family(name, family):
    assert backbone_family(name) == family
    assert is_tiny(name) == name.startswith("tiny_")


def test_task_falls_back_to_the_data_name(published):
    runs = frame(*ft_runs(task=None, **{"config.data.name": "mmedit_caption"}))
    table = build_table("odedit", "table1", runs, published=published)
    assert row(table, "FT", task="caption")["n_runs"] == 3
    assert row(table, "FT", task="vqa", backbone="blip2")["n_runs"] == 0


def test_sequential_horizons_are_separate_and_T1_is_single(published):
    runs = frame(run_row("ft", 0, protocol="sequential", T=5, metrics={"rel": 40.0}),
                 run_row("ft", 0, protocol="sequential", T=10, metrics={"rel": 20.0}),
                 run_row("ft", 0, protocol="sequential", T=1, metrics={"rel": 99.0}))
    table2 = build_table("odedit", "table2", runs, published=published)
    assert list(table2["T"]) == [5, 10, 5]
    assert list(table2["rel.ours"].iloc[:2]) == [40.0, 20.0]
    ft = row(build_table("odedit", "table1", runs, published=published), "FT", task="vqa",
             backbone="blip2")
    assert ft["rel.ours"] == 99.0  # a sequence of one edit is single editing
    assert protocol_key("sequential", 1) == protocol_key("single", None) == ("single", 1)


def test_settings_match_through_the_config_mapping(tmp_path):
    pub = write_published(tmp_path, "odedit", [
        cell("table9", "λ=1e-3", "rel", 1.0, reg="odedit", setting="lambda=1e-3"),
        cell("table9", "λ=0.01", "rel", 1.0, reg="odedit", setting="lambda=0.01"),
        cell("table9", "adaptive", "rel", 1.0, reg="odedit"),
        cell("table9", "no_rel", "rel", 1.0, reg="odedit", setting="variant=no_rel"),
    ])
    cfg = {"reg.variant": "full", "reg.tv_depth": 3}
    runs = frame(
        run_row("ft", 0, reg="odedit", metrics={"rel": 10.0},
                config={**cfg, "reg.tv_lambda": 0.001}),
        run_row("ft", 0, reg="odedit", metrics={"rel": 20.0},
                config={**cfg, "reg.tv_lambda": 0.01}),
        run_row("ft", 0, reg="odedit", metrics={"rel": 30.0},
                config={**cfg, "reg.tv_lambda": "adaptive"}),
        run_row("ft", 0, reg="odedit", metrics={"rel": 40.0},
                config={**cfg, "reg.tv_lambda": "adaptive", "reg.variant": "no_rel"}),
        run_row("ft", 1, reg="odedit", metrics={"rel": 50.0}),  # no settings in its config
    )
    table = build_table("odedit", "table9", runs, published=pub)
    # numbers compare numerically (1e-3 == 0.001); the default row takes the paper's main
    # configuration (adaptive, full) plus runs that do not have those keys at all.
    assert list(table["rel.ours"]) == [10.0, 20.0, pytest.approx(40.0), 40.0]
    assert list(table["n_runs"]) == [1, 1, 2, 1]


def test_setting_helpers():
    assert parse_setting("beta=15;tau=4") == {"beta": "15", "tau": "4"}
    assert parse_setting("") == {} and parse_setting(None) == {}
    assert same_value(0.001, "1e-3") and same_value("Adaptive", "adaptive")
    assert same_value(True, "true") and not same_value(4, "8")
    with pytest.raises(ValueError):
        parse_setting("lambda")


def test_pooling_differing_settings_warns(tmp_path):
    pub = write_published(tmp_path, "more", [cell("table9", "M-ORE", "rel", 1.0, editor="more")])
    kl = {"eval.locality": "kl"}
    runs = frame(run_row("more", 0, config={"editor.rank": 128, **kl}),
                 run_row("more", 1, config={"editor.rank": 512, **kl}))
    with pytest.warns(UserWarning, match="pooling runs with different rank"):
        build_table("more", "table9", runs, published=pub)


def test_derived_and_relative_columns(tmp_path):
    five = {"rel": 1.0, "t_gen": 1.0, "m_gen": 1.0, "t_loc": 1.0, "m_loc": 1.0, "avg": 1.0}
    keys = dict(editor="more", protocol="online", T=10, backbone="llava", task="caption")
    pub = write_published(tmp_path, "more", [
        *row_cells("table3", "M-ORE_10", five, **keys),
        *row_cells("table3", "w/o freezing", {**five, "avg_delta": -10.4}, **keys,
                   setting="variant=no_freeze"),
    ])
    full = {0: [100, 90, 80, 70, 60], 1: [90, 90, 90, 90, 90]}
    ablated = {0: [50, 50, 50, 50, 50], 1: [80, 80, 80, 80, 100]}
    rows = []
    for seed in (0, 1):
        for variant, values in (("full", full), ("no_freeze", ablated)):
            rows.append(run_row("more", seed, backbone="tiny_llava", task="caption",
                                protocol="online", T=10,
                                metrics=dict(zip(("rel", "t_gen", "m_gen", "t_loc", "m_loc"),
                                                 map(float, values[seed]))),
                                config={"editor.variant": variant, "eval.locality": "kl"}))
    table = build_table("more", "table3", frame(*rows), published=pub)
    assert table.attrs["metrics"] == ["rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg",
                                      "avg_delta"]
    avg_full = [np.mean(full[s]) for s in (0, 1)]
    avg_ablated = [np.mean(ablated[s]) for s in (0, 1)]
    assert table.loc[0, "avg.ours"] == pytest.approx(np.mean(avg_full))
    deltas = [a - f for a, f in zip(avg_ablated, avg_full)]
    assert table.loc[1, "avg_delta.ours"] == pytest.approx(np.mean(deltas))
    assert table.loc[1, "avg_delta.ours_std"] == pytest.approx(np.std(deltas, ddof=1))
    assert math.isnan(table.loc[0, "avg_delta.ours"])  # the reference row prints "–"
    assert table.loc[1, "avg_delta.paper"] == -10.4
    assert DERIVED_METRICS["gen"].inputs == ("t_gen",)
    assert column_label("avg") == "Avg." and column_label("gen") == "Gen."


def test_runs_with_other_metric_definitions_are_left_out_with_a_warning(tmp_path):
    pub = write_published(tmp_path, "more", [cell("table1", "FT-L", "rel", 1.0, editor="ft_l")])
    runs = frame(run_row("ft_l", 0))  # eval.locality=topk, M-ORE reports exp(-KL)
    with pytest.warns(UserWarning, match="eval.locality=kl"):
        table = build_table("more", "table1", runs, published=pub)
    assert table.loc[0, "n_runs"] == 0


def test_hyperparameter_columns_and_cost_columns(tmp_path):
    pub = write_published(tmp_path, "asam", [
        cell("table5", "Perturbation budget", "eps", 0.001, backbone="", task="", editor="",
             reg="asam", protocol=""),
        cell("table8", "WISE+ours", "memory_mb", 10774, editor="wise", reg="asam"),
        cell("table8", "WISE+ours", "runtime_s", 1613.76, editor="wise", reg="asam"),
        cell("table8", "WISE", "memory_gb", 10.4, editor="wise"),
    ])
    runs = frame(run_row("wise", 0, reg="asam", config={"reg.eps": 0.001},
                         **{"cost.peak_rss_mb": 1000.0, "cost.wall_s": 12.0}),
                 run_row("wise", 0, **{"cost.peak_rss_mb": 512.0, "cost.memory_gb": 3.0}))
    assert build_table("asam", "table5", runs, published=pub).loc[0, "eps.ours"] == 0.001
    table8 = build_table("asam", "table8", runs, published=pub)
    assert table8.loc[0, "memory_mb.ours"] == 1000.0 and table8.loc[0, "runtime_s.ours"] == 12.0
    assert table8.loc[1, "memory_gb.ours"] == 3.0  # an exact cost.<key> column wins


def test_build_from_run_folders(tmp_path, published):
    for seed, rel in ((0, 80.0), (1, 90.0)):
        write_run(tmp_path / "runs" / f"ft{seed}", seed=seed,
                  metrics={"rel": rel, "t_gen": 1.0, "m_gen": 1.0, "t_loc": 1.0, "m_loc": 1.0})
        write_run(tmp_path / "runs" / f"odedit{seed}", seed=seed, reg="odedit",
                  reg_config={"tv_lambda": 0.01, "variant": "full"},
                  metrics={"rel": 99.0, "t_gen": 1.0, "m_gen": 1.0, "t_loc": 1.0, "m_loc": 1.0})
    table = build_table("odedit", "table1", tmp_path / "runs", published=published)
    assert row(table, "FT", backbone="blip2", task="vqa")["rel.ours"] == 85.0
    # the ODEdit runs used a fixed lambda, not the paper's adaptive one: not in Table 1
    assert row(table, "FT+ODEdit")["n_runs"] == 0


def test_unknown_tables_name_the_available_ones(published):
    with pytest.raises(UnknownTableError, match=r"odedit\.table7.*odedit\.table1, odedit\.table2"):
        build_table("odedit", "table7", frame(), published=published)
    with pytest.raises(UnknownTableError, match="unknown paper"):
        build_table("nope", "table1", frame(), published=published)
    with pytest.raises(UnknownTableError, match="asam.csv does not exist"):
        build_table("asam", "table1", frame(), published=published)


def test_no_runs_gives_an_all_missing_table(published):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = build_table("odedit", "table1", pd.DataFrame(), published=published)
    assert (table["n_runs"] == 0).all() and table.filter(like=".ours").isna().all().all()


def test_runs_table_without_published_numbers():
    runs = frame(*ft_runs(), run_row("ft", 0, reg="odedit"), run_row("none", 0))
    table = runs_table("odedit", runs)
    assert list(table["row_label"]) == ["ft", "ft+odedit", "none"]
    assert table.loc[0, "rel.ours"] == pytest.approx(95.0)
    assert table["rel.paper"].isna().all()


def greedy_runs() -> list[dict]:
    return [run_row("ft", seed, metrics={"rel": 100.0, "t_gen": 100.0, "m_gen": 100.0,
                                         "t_loc": 90.0, "m_loc": 80.0, "rel_greedy": g,
                                         "t_gen_greedy": g - 10, "t_loc_greedy": 70.0,
                                         "m_loc_greedy": 60.0})
            for seed, g in enumerate((40.0, 60.0))]


def test_greedy_answers_stand_beside_the_teacher_forced_ones(published):
    runs = frame(*greedy_runs())
    both = row(build_table("odedit", "table1", runs, published=published, answers="both"),
               "FT", backbone="blip2", task="vqa")
    assert both["rel.ours"] == 100.0 and both["rel_greedy.ours"] == pytest.approx(50.0)
    assert both["gen_greedy.ours"] == pytest.approx(40.0)  # Gen. on greedy answers: t_gen_greedy
    assert both["rel.paper"] == 100.0 and math.isnan(both["rel_greedy.paper"])  # none published
    greedy = build_table("odedit", "table1", runs, published=published, answers="greedy")
    assert greedy.attrs["metrics"] == ["rel_greedy", "gen_greedy", "t_loc_greedy", "m_loc_greedy"]
    assert column_label("rel_greedy") == "Rel. (greedy)"
    with pytest.raises(ValueError, match="answers"):
        build_table("odedit", "table1", runs, published=published, answers="sampled")


def test_papers_need_their_locality_positions(published):
    runs = frame(*ft_runs(config={"eval.loc_positions": "text"}))
    with pytest.warns(UserWarning, match="eval.loc_positions=easyedit"):
        table = build_table("odedit", "table1", runs, published=published)
    assert row(table, "FT", backbone="blip2", task="vqa")["n_runs"] == 0
    runs = frame(*ft_runs(config={"eval.loc_positions": "easyedit"}))
    assert row(build_table("odedit", "table1", runs, published=published), "FT",
               backbone="blip2", task="vqa")["n_runs"] == 3


@pytest.mark.parametrize("paper", ["odedit", "asam"])
def test_a_run_with_the_regularizers_default_config_is_the_papers_main_configuration(paper):
    """Each setting a paper's main rows assume holds in conf/reg/<paper>.yaml, where that file
    has the setting's key, so a default run fills the main rows."""
    from pathlib import Path

    import yaml

    from mmke.tables.matching import same_value
    from mmke.tables.papers import PAPERS, setting_keys

    conf = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / "reg"
                           / f"{paper}.yaml").read_text())
    checked = 0
    for name, wanted in PAPERS[paper].defaults.items():
        for key in setting_keys(paper, name):
            group, _, field = key.partition(".")
            if group == "reg" and field in conf:
                assert same_value(conf[field], wanted), (name, key, conf[field], wanted)
                checked += 1
                break
    assert checked >= 4
