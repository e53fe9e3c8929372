"""A Hydra multirun with the basic launcher: one backbone load for all jobs, results equal to
fresh single runs, a restarted sweep that skips finished jobs, and one killed mid-way."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mmke.results import load_runs, load_summaries
from mmke.runner import run
from tests.conftest import ROOT, compose_config
from tests.sweeps.cli import cli_env, read_json, results_of, run_sweep, sweep_command

N_EDITS = 2
#: 2 x 2 = 4 jobs that differ in results
SWEEP = ("n_edits=2", "editor.lr=0.002,0.02", "editor.steps=2,6")
JOBS = [("0.002", "2"), ("0.002", "6"), ("0.02", "2"), ("0.02", "6")]
RESULT_FILES = ("config.yaml", "meta.json", "edits.jsonl", "summary.json")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, pretrained) -> Path:
    sweep_dir = tmp_path_factory.mktemp("sweep") / "s"
    run_sweep(sweep_dir, *SWEEP)
    return sweep_dir


def job_overrides(num: int) -> list[str]:
    lr, steps = JOBS[num]
    return [f"n_edits={N_EDITS}", f"editor.lr={lr}", f"editor.steps={steps}"]


def test_every_job_is_written_once(finished_sweep) -> None:
    sweep_dir = finished_sweep
    summaries = load_summaries(sweep_dir)
    assert len(summaries) == 4 and summaries["config_hash"].is_unique
    assert sorted(summaries["run_dir"]) == [str(sweep_dir / str(n)) for n in range(4)]


def test_the_backbone_is_loaded_once_and_results_equal_fresh_runs(finished_sweep, tmp_path) -> None:
    sweep_dir = finished_sweep
    metas = [read_json(sweep_dir / str(n) / "meta.json") for n in range(4)]
    assert [m["backbone_reused"] for m in metas] == [False, True, True, True]
    assert all(m["backbone_loads"] == 1 for m in metas)
    assert [m["job_num"] for m in metas] == [0, 1, 2, 3]
    for num in range(4):  # a fresh process-free run: its own backbone, nothing reused
        fresh = tmp_path / f"fresh{num}"
        summary = run(compose_config(job_overrides(num)), fresh)
        assert results_of(sweep_dir / str(num)) == results_of(fresh), f"job {num}"
        assert summary["config_hash"] == metas[num]["config_hash"]


def test_a_second_identical_sweep_runs_nothing(finished_sweep) -> None:
    """Nothing runs: no run folder, no backbone load, no result file touched (how long it takes
    is a benchmark's business, not a test's)."""
    sweep_dir = finished_sweep
    stamps = {(n, name): (sweep_dir / str(n) / name).stat().st_mtime_ns
              for n in range(4) for name in RESULT_FILES}
    proc = run_sweep(sweep_dir, *SWEEP)
    log = proc.stdout + proc.stderr
    assert log.count("skipping: finished in") == 4
    assert "run folder:" not in log and "backbone" not in log.lower()
    assert stamps == {(n, name): (sweep_dir / str(n) / name).stat().st_mtime_ns
                      for n in range(4) for name in RESULT_FILES}
    assert len(load_summaries(sweep_dir)) == 4


def test_a_killed_sweep_started_again_finishes_the_rest(tmp_path, pretrained) -> None:
    sweep_dir = tmp_path / "s"
    out = open(tmp_path / "first.log", "w")
    # own process group: the kill takes Hydra and anything it started, as a dying node would
    proc = subprocess.Popen(sweep_command(sweep_dir, *SWEEP), cwd=ROOT, env=cli_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    first_summary = sweep_dir / "0" / "summary.json"
    deadline = time.monotonic() + 600
    while not first_summary.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out.close()
    assert first_summary.exists(), (tmp_path / "first.log").read_text()[-3000:]
    done_before = [n for n in range(4) if (sweep_dir / str(n) / "summary.json").exists()]
    assert done_before and len(done_before) < 4, "the kill came too late to test anything"
    stamps = {n: (sweep_dir / str(n) / "summary.json").stat().st_mtime_ns for n in done_before}

    proc = run_sweep(sweep_dir, *SWEEP)
    log = proc.stdout + proc.stderr
    assert log.count("skipping: finished in") == len(done_before)
    assert stamps == {n: (sweep_dir / str(n) / "summary.json").stat().st_mtime_ns
                      for n in done_before}  # finished jobs were not run again
    summaries = load_summaries(sweep_dir)
    assert len(summaries) == 4 and summaries["config_hash"].is_unique  # none lost or duplicated
    assert sorted(summaries["run_dir"]) == [str(sweep_dir / str(n)) for n in range(4)]
    assert (summaries["n_edits"] == N_EDITS).all()
    edits = load_runs(sweep_dir)
    assert len(edits) == 4 * N_EDITS and not edits.duplicated(["run_dir", "index"]).any()
    assert not list(sweep_dir.rglob("*.partial"))  # the interrupted job started over cleanly
