"""An Optuna search (``hparams_search=ft_lr``) over FT's lr and steps, on the tiny default."""

from __future__ import annotations

import math

from omegaconf import OmegaConf

from mmke.results import load_summaries
from mmke.sweep import objective_value
from tests.sweeps.cli import run_sweep


def test_three_trial_search_writes_its_best_trial(tmp_path, pretrained) -> None:
    sweep_dir = tmp_path / "opt"
    run_sweep(sweep_dir, "hparams_search=ft_lr", "hydra.sweeper.n_trials=3", "n_edits=2")
    result = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    assert result["name"] == "optuna"
    assert set(result["best_params"]) == {"editor.lr", "editor.steps"}
    assert 1e-4 <= result["best_params"]["editor.lr"] <= 1e-1
    assert 5 <= result["best_params"]["editor.steps"] <= 50
    assert isinstance(result["best_params"]["editor.steps"], int)

    summaries = load_summaries(sweep_dir)
    assert len(summaries) == 3
    # the objective is M-ORE's Avg., and the best value is the best trial's
    values = [objective_value(s, "avg") for s in summaries.to_dict("records")]
    assert all(math.isfinite(v) for v in values)
    assert math.isclose(result["best_value"], max(values), rel_tol=1e-9)
