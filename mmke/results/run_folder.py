"""One run folder: the only place where a run's results are written.

Layout, in the order the files appear::

    config.yaml            resolved config (atomic)
    meta.json              git commit, versions, start time (atomic)
    edits.jsonl.partial    one JSON line per edit, appended and flushed as the run goes
    edits.jsonl            the partial file renamed at ``finish`` after an fsync
    probes.jsonl           general-capability probe rows (one per model state and category),
                           only when the run probes (``eval.probes``); written like edits.jsonl
    summary.json           written last (atomic): its presence means the run is complete

A run that crashes leaves no ``summary.json`` and no ``edits.jsonl``, so nothing half-written
is ever mistaken for a result; ``load_runs`` skips such folders with a warning.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

import mmke
from mmke.errors import ConfigError
from mmke.results.atomic import atomic_write_json, atomic_write_text, fsync_dir, to_jsonable

CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
EDITS_FILE = "edits.jsonl"
PARTIAL_FILE = "edits.jsonl.partial"
SUMMARY_FILE = "summary.json"
PROBES_FILE = "probes.jsonl"
PROBES_PARTIAL_FILE = "probes.jsonl.partial"


class _JsonLines:
    """One JSON-lines result file: appended to ``<name>.partial`` and flushed line by line,
    published under its name by ``publish`` (fsync, then an atomic rename)."""

    def __init__(self, folder: Path, name: str, partial: str) -> None:
        self.path, self.partial = folder / name, folder / partial
        self._file: IO[str] | None = None
        self.n = 0

    def add(self, row: Mapping[str, Any]) -> None:
        if not isinstance(row, Mapping):
            raise TypeError(f"a result row must be a mapping, got {type(row).__name__}")
        if self._file is None:
            self._file = open(self.partial, "w", encoding="utf-8")
        self._file.write(json.dumps(to_jsonable(row), ensure_ascii=False) + "\n")
        self._file.flush()
        self.n += 1

    def publish(self, always: bool) -> None:
        """Rename the partial file to its name (an empty file when ``always`` and no rows)."""
        if self._file is None:
            if not always:
                return
            self._file = open(self.partial, "w", encoding="utf-8")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RunWriter:
    """Writes one run folder. Only the main process writes: with ``is_main=False`` (the other
    ranks of a distributed run) every method is a no-op, so callers need no rank checks."""

    def __init__(self, run_dir: Path, is_main: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self._started = datetime.now(timezone.utc)
        self._edits = _JsonLines(self.run_dir, EDITS_FILE, PARTIAL_FILE)
        self._probes = _JsonLines(self.run_dir, PROBES_FILE, PROBES_PARTIAL_FILE)
        self._finished = False
        if not is_main:
            return
        if self.is_complete(self.run_dir):
            # Appending to a finished run would mix two runs' edits under one summary.
            raise ConfigError(f"run folder {self.run_dir} already holds a complete run "
                              f"({SUMMARY_FILE} exists); choose a new output folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of a crashed attempt in the same folder are not this run's results.
        for name in (EDITS_FILE, PARTIAL_FILE, PROBES_FILE, PROBES_PARTIAL_FILE):
            (self.run_dir / name).unlink(missing_ok=True)

    @property
    def n_edits(self) -> int:
        """Edit rows written so far."""
        return self._edits.n

    @staticmethod
    def is_complete(run_dir: str | Path) -> bool:
        """Whether ``run_dir`` holds a finished run (``summary.json`` is written last)."""
        return (Path(run_dir) / SUMMARY_FILE).is_file()

    def write_config(self, resolved: Mapping[str, Any] | DictConfig,
                     meta: Mapping[str, Any] | None = None) -> None:
        """Write ``config.yaml`` (the resolved config) and ``meta.json`` (provenance, plus the
        run's own ``meta`` entries: its config hash, device, backbone reuse)."""
        if not self.is_main:
            return
        if isinstance(resolved, DictConfig):
            resolved = OmegaConf.to_container(resolved, resolve=True)  # type: ignore[assignment]
        atomic_write_text(self.run_dir / CONFIG_FILE, OmegaConf.to_yaml(to_jsonable(resolved)))
        atomic_write_json(self.run_dir / META_FILE, {**self._meta(), **(meta or {})})

    def add_edit(self, row: Mapping[str, Any]) -> None:
        """Append one edit's metrics as a JSON line and flush, so a crash loses at most this row."""
        if not self.is_main:
            return
        if self._finished:
            raise RuntimeError(f"add_edit after finish for run folder {self.run_dir}")
        self._edits.add(row)

    def add_probe(self, row: Mapping[str, Any]) -> None:
        """Append one general-capability probe row (a model state's score on one category)."""
        if not self.is_main:
            return
        if self._finished:
            raise RuntimeError(f"add_probe after finish for run folder {self.run_dir}")
        self._probes.add(row)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Publish ``edits.jsonl`` (and ``probes.jsonl`` when the run probed), then
        ``summary.json``; after this the run counts as complete."""
        if not self.is_main:
            return
        if self._finished:
            raise RuntimeError(f"finish called twice for run folder {self.run_dir}")
        self._edits.publish(always=True)  # a run with no edits still gets an (empty) edits file
        self._probes.publish(always=False)
        fsync_dir(self.run_dir)  # the rename must be on disk before summary.json claims success
        atomic_write_json(self.run_dir / SUMMARY_FILE, dict(summary))
        self._finished = True

    def close(self) -> None:
        """Close the partial files without finishing: the folder stays an incomplete run."""
        self._edits.close()
        self._probes.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self) -> dict[str, Any]:
        """Provenance without machine-specific data (no hostname, no paths)."""
        commit, dirty = _git_state(Path(mmke.__file__).resolve().parent)
        return {
            "git_commit": commit,
            "git_dirty": dirty,
            "mmke_version": mmke.__version__,
            "python_version": platform.python_version(),
            "torch_version": _dist_version("torch"),
            "started_at": self._started.isoformat(timespec="seconds"),
        }


def _dist_version(name: str) -> str | None:
    """Installed version of a distribution, read from metadata so torch is not imported here."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(repo_dir: Path, *args: str) -> str | None:
    """Output of a git command in ``repo_dir``, or None when git is missing or fails."""
    try:
        done = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_state(repo_dir: Path) -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout holding the mmke package; ("unknown", None) outside git.

    Dirty means modified tracked files (like ``git describe --dirty``); untracked scratch files
    do not count.
    """
    commit = _git(repo_dir, "rev-parse", "HEAD")
    if not commit:
        return "unknown", None
    status = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)
