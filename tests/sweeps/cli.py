"""``python run.py -m ...`` in a subprocess, as a user starts a sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, cache_dir


def sweep_command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "run.py", "-m", "progress=false", f"hydra.sweep.dir={sweep_dir}",
            *overrides]


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "MMKE_CACHE_DIR": str(cache_dir()), "PYTHONUNBUFFERED": "1", **extra}


def run_sweep(sweep_dir: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a sweep to its end; fail the test with the output's tail if it fails."""
    proc = subprocess.run(sweep_command(sweep_dir, *overrides), cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def edit_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "edits.jsonl").read_text().splitlines()]


#: Fields of an edit row that are measured costs, not results.
COST_FIELDS = ("edit_s", "eval_s", "peak_mem_mb", "incremental_mem_mb")


def results_of(run_dir: Path) -> list[dict]:
    """The edit rows without their measured costs."""
    return [{k: v for k, v in row.items() if k not in COST_FIELDS} for row in edit_rows(run_dir)]
