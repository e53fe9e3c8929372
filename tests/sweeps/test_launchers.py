"""Launchers: SLURM (submitit) composes and instantiates; joblib runs jobs in parallel worker
processes that reuse their backbone."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from mmke.results import load_summaries
from tests.conftest import CONF
from tests.sweeps.cli import read_json, run_sweep


def hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def launcher(cfg):
    """The launcher Hydra would build for this config. Its ``${hydra:...}`` interpolations
    need the process-wide HydraConfig, which is put back afterwards for the other tests."""
    hydra_config_state = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        return instantiate(cfg.hydra.launcher)
    finally:
        HydraConfig.instance().cfg = hydra_config_state


def test_slurm_launcher_composes_and_instantiates(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MMKE_SLURM_PARTITION", "gpu")
    monkeypatch.delenv("MMKE_SLURM_ACCOUNT", raising=False)
    cfg = hydra_config("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}",
                       "hydra.launcher.timeout_min=30")
    obj = launcher(cfg)
    assert type(obj).__name__ == "SlurmLauncher"
    params = obj.params
    assert params["partition"] == "gpu" and params["account"] is None
    assert params["timeout_min"] == 30 and params["gpus_per_node"] == 1
    assert params["tasks_per_node"] == 1 and params["mem_gb"] == 64
    assert params["submitit_folder"] == f"{tmp_path}/.submitit/%j"


def test_slurm_partition_is_null_unless_set(monkeypatch) -> None:
    monkeypatch.delenv("MMKE_SLURM_PARTITION", raising=False)
    assert launcher(hydra_config("hydra/launcher=slurm")).params["partition"] is None


def test_joblib_launcher_composes_with_n_jobs() -> None:
    obj = launcher(hydra_config("hydra/launcher=joblib", "hydra.launcher.n_jobs=3"))
    assert type(obj).__name__ == "JoblibLauncher" and obj.joblib["n_jobs"] == 3


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_workers(tmp_path, pretrained) -> None:
    sweep_dir = tmp_path / "s"
    run_sweep(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "n_edits=2",
              "seed=0,1,2")
    summaries = load_summaries(sweep_dir)
    assert len(summaries) == 3 and summaries["config_hash"].is_unique
    metas = [read_json(sweep_dir / str(n) / "meta.json") for n in range(3)]
    assert [m["job_num"] for m in metas] == [0, 1, 2]
    # two workers for three jobs: one worker ran two jobs and loaded its backbone once
    assert all(m["backbone_loads"] == 1 for m in metas)
    assert sum(m["backbone_reused"] for m in metas) >= 1
