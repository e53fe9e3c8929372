"""Scale figures (issue 4): parallel sweeps and one run over several processes. Prints figures;
asserts nothing.

    python benchmarks/scale.py [--jobs 8] [--sweep-edits 25] [--edits 200] [--processes 2]
                               [--skip-sweep] [--skip-launch]

1. Sweep: ``python run.py -m seed=0,...,7`` on the cached tiny default, with the joblib launcher
   (2 workers) against Hydra's basic launcher (one job after another): wall times and their
   ratio (target: joblib <= 0.6x basic).
2. One run over several processes: ``--edits`` single edits under ``accelerate launch`` with
   ``--processes`` CPU processes against ``python run.py``: wall time of the edit loop
   (``cost.loop_s``, without building and loading), the speed-up (target >= 1.5x), and whether
   the per-edit rows agree. A one-process run with ``cpu_threads=1`` is timed too, to tell the
   gain of parallel processes from the cost of torch's threads on tiny tensors.

Both parts run real ``run.py`` subprocesses, so on a shared machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import METRICS  # noqa: E402

COST_SUFFIXES = ("_s", "_mb")  # per-edit seconds and megabytes differ from run to run


def cache_dir() -> str:
    return os.environ.get("MMKE_CACHE_DIR", str(ROOT / ".cache" / "mmke"))


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "MMKE_CACHE_DIR": cache_dir(), **extra}


def timed(cmd: list[str], **extra_env: str) -> float:
    """Run ``cmd`` in the repository root; its wall time in seconds. A failure is shown, then
    raised."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        proc.check_returncode()
    return time.perf_counter() - start


def bench_sweep(jobs: int, n_edits: int, out: Path) -> None:
    seeds = "seed=" + ",".join(str(s) for s in range(jobs))
    common = [sys.executable, "run.py", "-m", seeds, f"n_edits={n_edits}", "progress=false"]
    parallel = timed([*common, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      f"hydra.sweep.dir={out / 'joblib'}"])
    serial = timed([*common, f"hydra.sweep.dir={out / 'basic'}"])
    print(f"[sweep] {jobs} jobs x {n_edits} single edits, tiny default")
    print(f"  basic launcher (one after another): {serial:7.1f} s")
    print(f"  joblib launcher, 2 workers        : {parallel:7.1f} s")
    print(f"  ratio joblib / basic              : {parallel / serial:7.2f} (target <= 0.6)")


def accelerate_cmd(processes: int) -> list[str]:
    """``accelerate launch`` on ``processes`` CPU processes: its torchrun route (``--multi_gpu``)
    with ACCELERATE_USE_CPU set by the caller; its ``--cpu`` route needs MPI for several."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0"]


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "edits.jsonl").read_text().splitlines()]
    return summary, rows


def bench_launch(n_edits: int, processes: int, out: Path) -> None:
    args = ["run.py", f"n_edits={n_edits}", "progress=false"]
    one_wall = timed([sys.executable, *args, f"hydra.run.dir={out / 'one'}"])
    # One process with one thread: tells the gain of parallel processes from the loss of torch's
    # intra-op threads on tiny tensors (or on a machine whose cores are busy).
    timed([sys.executable, *args, "cpu_threads=1", f"hydra.run.dir={out / 'one_t1'}"])
    many_wall = timed([*accelerate_cmd(processes), *args, f"hydra.run.dir={out / 'many'}"],
                      ACCELERATE_USE_CPU="1")
    (one, one_rows), (many, many_rows) = read_run(out / "one"), read_run(out / "many")
    same_metrics = [[r[m] for m in METRICS] for r in one_rows] == \
        [[r[m] for m in METRICS] for r in many_rows]
    differing = {k for r, s in zip(one_rows, many_rows) for k in r
                 if not k.endswith(COST_SUFFIXES) and r[k] != s.get(k)}
    n_same = sum(all(r[k] == s.get(k) for k in r if not k.endswith(COST_SUFFIXES))
                 for r, s in zip(one_rows, many_rows))
    loop_1, loop_n = one["cost"]["loop_s"], many["cost"]["loop_s"]
    loop_t1 = read_run(out / "one_t1")[0]["cost"]["loop_s"]
    print(f"[accelerate] {n_edits} single edits, tiny default, CPU "
          f"({os.cpu_count()} cores on this machine)")
    print(f"  python run.py              : loop {loop_1:7.1f} s   run {one_wall:6.1f} s")
    print(f"  python run.py cpu_threads=1: loop {loop_t1:7.1f} s")
    print(f"  accelerate launch, {processes} procs : loop {loop_n:7.1f} s   run {many_wall:6.1f} s "
          f"(n_processes={many['n_processes']})")
    print(f"  speed-up of the edit loop  : {loop_1 / loop_n:7.2f}x (target >= 1.5x); "
          f"{loop_t1 / loop_n:.2f}x against one single-threaded process")
    print(f"  per-edit metrics identical : {'yes' if same_metrics else 'NO'}")
    print(f"  rows identical but cost    : {n_same} of {len(one_rows)}"
          + (f" (others differ in {', '.join(sorted(differing))}: the processes use fewer torch "
             "threads, which reorders float sums; cpu_threads=1 on both sides makes them equal)"
             if differing else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--sweep-edits", type=int, default=25)
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-launch", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if not args.skip_sweep:
            bench_sweep(args.jobs, args.sweep_edits, out)
        if not args.skip_launch:
            bench_launch(args.edits, args.processes, out)


if __name__ == "__main__":
    main()
