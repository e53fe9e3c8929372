"""One run over several processes: sharding rules, launch checks, and real `accelerate launch`
runs on the CPU compared row by row with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from mmke.distributed import default_cpu_threads, shard_range
from mmke.errors import ConfigError
from mmke.launch import check_launch, rank_overrides
from tests.conftest import ROOT, cache_dir

#: Cost fields (seconds, megabytes) differ between runs; everything else in a row must not.
COST_SUFFIXES = ("_s", "_mb")


# --- sharding -------------------------------------------------------------------------------

@pytest.mark.parametrize("n, unit, world", [(6, 1, 2), (7, 1, 3), (50, 1, 4), (12, 3, 2),
                                            (20, 5, 3), (4, 2, 2), (9, 1, 1)])
def test_shards_are_contiguous_balanced_and_cover_every_record_once(n, unit, world):
    shards = [shard_range(n, unit, rank, world) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(n))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= unit and all(s % unit == 0 for s in sizes)
    assert all(shard.start % unit == 0 for shard in shards)  # streams start on a stream boundary


def test_earlier_ranks_take_the_remainder():
    assert [shard_range(7, 1, r, 3) for r in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]


def test_fewer_streams_than_processes_is_refused():
    with pytest.raises(ConfigError, match="a stream cannot be split.*at most 1 process"):
        shard_range(4, 4, 0, 2)
    with pytest.raises(ConfigError, match="3 edit\\(s\\) for 4 processes"):
        shard_range(3, 1, 0, 4)


def test_records_that_do_not_split_into_streams_are_refused():
    with pytest.raises(ConfigError, match="multiple of protocol.T"):
        shard_range(10, 3, 0, 2)


def test_rank_outside_the_world_is_a_bug():
    with pytest.raises(ValueError):
        shard_range(4, 1, 2, 2)


def test_cpu_threads_are_shared_among_processes_on_one_machine():
    assert default_cpu_threads(1, 1, 16) is None  # one process: torch's own default
    assert default_cpu_threads(2, 2, 2) == 1
    assert default_cpu_threads(4, 2, 16) == 8  # two machines, two processes each
    assert default_cpu_threads(8, 8, 2) == 1


# --- launch checks --------------------------------------------------------------------------

def test_only_other_ranks_are_kept_from_writing_hydra_files():
    assert rank_overrides(["n_edits=6"], 0) == []
    assert rank_overrides(["n_edits=6"], 1) == ["hydra.output_subdir=null", "hydra/job_logging=none"]
    assert rank_overrides(["hydra/job_logging=stdout"], 1) == ["hydra.output_subdir=null"]


def hydra_node(mode: RunMode, run_dir: str):
    return OmegaConf.create({"mode": mode, "run": {"dir": run_dir}})


def test_multirun_with_several_processes_is_refused():
    with pytest.raises(ConfigError, match="never combine -m with accelerate launch"):
        check_launch(hydra_node(RunMode.MULTIRUN, "fixed"), 2)
    check_launch(hydra_node(RunMode.MULTIRUN, "x/${now:%H}"), 1)  # a plain sweep is fine


def test_a_run_folder_named_after_the_clock_is_refused_for_several_processes():
    with pytest.raises(ConfigError, match="hydra.run.dir="):
        check_launch(hydra_node(RunMode.RUN, "outputs/${now:%H-%M-%S}"), 2)
    check_launch(hydra_node(RunMode.RUN, "outputs/fixed"), 2)


# --- real launches --------------------------------------------------------------------------

def env() -> dict[str, str]:
    return {**os.environ, "MMKE_CACHE_DIR": str(cache_dir()), "PYTHONUNBUFFERED": "1"}


def _accelerate(processes: int, *target: str) -> subprocess.CompletedProcess:
    """`accelerate launch <target>` on `processes` CPU processes. Accelerate's `--cpu` route
    starts several processes only through MPI; `--multi_gpu` is its torchrun route, and
    ACCELERATE_USE_CPU keeps those processes on the CPU (gloo), on any machine."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", *target]
    return subprocess.run(cmd, cwd=ROOT, env={**env(), "ACCELERATE_USE_CPU": "1"},
                          capture_output=True, text=True, timeout=600)


def launch(processes: int, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch run.py overrides` on `processes` CPU processes (the overrides come
    before progress=false: they may start with -m)."""
    return _accelerate(processes, "run.py", *overrides, "progress=false")


def launch_module(processes: int, module: str, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch -m module args` on `processes` CPU processes."""
    return _accelerate(processes, "-m", module, *args)


def single(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "progress=false", *overrides], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "edits.jsonl").read_text().splitlines()]


def without_cost(run_rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith(COST_SUFFIXES)} for row in run_rows]


def assert_same_run(one: Path, two: Path) -> None:
    assert without_cost(rows(two)) == without_cost(rows(one))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert a.pop("n_processes") == 1 and b.pop("n_processes") == 2
    assert {k: v for k, v in a.items() if k != "cost"} == {k: v for k, v in b.items() if k != "cost"}


# Both sides use one torch thread per process: the thread count changes the order of float sums,
# so with different counts losses may differ in the last digits (the metrics do not).
THREADS = "cpu_threads=1"


def test_two_processes_give_the_single_edit_rows_of_one(tmp_path, pretrained):
    one, two = tmp_path / "one", tmp_path / "two"
    ref = single("n_edits=6", THREADS, f"hydra.run.dir={one}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = launch(2, "n_edits=6", THREADS, f"hydra.run.dir={two}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(one, two)
    assert [r["index"] for r in rows(two)] == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # nothing else written
    assert proc.stdout.count("run folder:") == 1  # only the main process reports


@pytest.mark.parametrize("protocol", ["sequential", "online"])
def test_two_processes_give_the_streams_of_one(tmp_path, pretrained, protocol):
    overrides = ("n_edits=4", f"protocol={protocol}", "protocol.T=2", THREADS)
    one, two = tmp_path / "one", tmp_path / "two"
    ref = single(*overrides, f"hydra.run.dir={one}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = launch(2, *overrides, f"hydra.run.dir={two}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(one, two)
    assert [(r["stream"], r["position"]) for r in rows(two)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_fewer_streams_than_processes_stops_with_a_message(tmp_path):
    proc = launch(2, "n_edits=4", "protocol=sequential", "protocol.T=4",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "exitcode: 2" in proc.stderr  # run.py's exit code, as the launcher reports it
    assert "error: 4 records make 1 stream(s) of T=4 records" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error:")[0]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_multirun_under_accelerate_launch_stops_with_a_message(tmp_path):
    proc = launch(2, "-m", "seed=0,1", "n_edits=2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr
    assert "never combine -m with accelerate launch" in proc.stderr
    assert not list(tmp_path.rglob("summary.json"))


def test_a_clock_named_run_folder_under_accelerate_launch_stops_with_a_message(tmp_path):
    proc = launch(2, "n_edits=2", f"paths.output_dir={tmp_path}")
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr
    assert "hydra.run.dir=" in proc.stderr
    assert not list(tmp_path.rglob("summary.json"))


def test_accelerate_cpu_route_without_mpi_is_explained(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "run.py", "progress=false", "n_edits=2", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "error: accelerate launch --cpu --num_processes N started one process" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
