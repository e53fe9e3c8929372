"""The job context: one accelerator per multirun job, resume roots, the sweep's name, and the
objective returned to sweepers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmke.errors import ConfigError
from mmke.sweep import JobContext, job_device, objective_value

ACCEL = "xpu"  # any accelerator type: the rule is the same for every kind


@pytest.mark.parametrize("num, count, index", [(0, 1, 0), (3, 1, 0), (0, 4, 0), (5, 4, 1),
                                               (7, 8, 7), (8, 8, 0)])
def test_each_job_gets_accelerator_num_mod_count(num, count, index) -> None:
    assert job_device(num, ACCEL, count) == torch.device(ACCEL, index)


def test_jobs_spread_evenly_over_the_accelerators() -> None:
    devices = [job_device(n, ACCEL, 3) for n in range(9)]
    assert [d.index for d in devices] == [0, 1, 2] * 3


@pytest.mark.parametrize("num, accel, count", [(None, ACCEL, 2), (3, None, 0), (3, ACCEL, 0)])
def test_no_assignment_outside_a_multirun_or_without_accelerators(num, accel, count) -> None:
    assert job_device(num, accel, count) is None


def test_negative_job_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match="job number"):
        job_device(-1, ACCEL, 2)


def test_only_a_backbone_on_device_auto_is_placed() -> None:
    job = JobContext(num=1, sweep_dir=Path("s"))
    expected = job_device(1, *_accelerator())
    assert job.backbone_device(OmegaConf.create({"device": "auto"})) == expected
    assert job.backbone_device(OmegaConf.create({"device": "cpu"})) is None
    assert job.backbone_device(OmegaConf.create({"device": "auto", "device_map": "auto"})) is None
    assert JobContext().backbone_device(OmegaConf.create({"device": "auto"})) is None


def _accelerator() -> tuple[str | None, int]:
    accel = torch.accelerator.current_accelerator(check_available=True)
    return (accel.type, torch.accelerator.device_count()) if accel is not None else (None, 0)


def test_resume_root_and_sweep_name() -> None:
    single = JobContext()
    assert single.resume_root(Path("runs/a")) == Path("runs/a") and single.sweep_name is None
    job = JobContext(num=2, sweep_dir=Path("outputs/multirun/2026-01-02/03-04-05"))
    assert job.resume_root(Path("x/2")) == Path("outputs/multirun/2026-01-02/03-04-05")
    assert job.sweep_name == "2026-01-02/03-04-05"


SUMMARY = {"rel": 90.0, "t_gen": 80.0, "m_gen": 70.0, "t_loc": 60.0, "m_loc": 50.0,
           "n_edits": 2, "cost": {"edit_s": 1.5}}


def test_objective_values() -> None:
    assert objective_value(SUMMARY, "rel") == 90.0
    assert objective_value(SUMMARY, "avg") == pytest.approx(70.0)  # M-ORE's Avg.
    assert objective_value(SUMMARY, "gen") == 80.0
    assert objective_value(SUMMARY, "cost.edit_s") == 1.5
    assert math.isnan(objective_value({**SUMMARY, "rel": None}, "rel"))  # every edit failed


@pytest.mark.parametrize("name", ["nope", "cost.nope", "rel.x", "cost"])
def test_unknown_objectives_name_the_choices(name) -> None:
    with pytest.raises(ConfigError, match="objective="):
        objective_value(SUMMARY, name)
