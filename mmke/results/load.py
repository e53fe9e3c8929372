"""Read run folders back into tidy pandas tables.

``load_runs`` gives one row per edit, ``load_summaries`` one row per run, ``load_probes`` one
row per general-capability probe (model state and category); all add the same
run-level columns read from each run's ``config.yaml`` so that runs can be grouped and compared.
Only complete runs (with ``summary.json``) are read; incomplete ones are skipped with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from mmke.errors import DataError
from mmke.results.atomic import flatten
from mmke.results.run_folder import (CONFIG_FILE, EDITS_FILE, META_FILE, PARTIAL_FILE,
                                     PROBES_FILE, SUMMARY_FILE, RunWriter)

#: (column, dotted config key, value when the key is missing). Missing keys never raise, so
#: configs written before a key existed still load; a run without ``protocol.T`` made one
#: edit per model state, hence T=1.
RUN_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("backbone", "backbone.name", None),
    ("editor", "editor.name", None),
    ("reg", "reg.name", None),
    ("task", "data.task", None),
    ("protocol", "protocol.name", None),
    ("T", "protocol.T", 1),
    ("seed", "seed", None),
)
RUN_COLUMN_NAMES: tuple[str, ...] = ("run_dir", *(name for name, _, _ in RUN_COLUMNS))

PathsLike = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def load_runs(paths: PathsLike) -> pd.DataFrame:
    """One row per edit of every complete run under ``paths``: run-level columns, then the
    edit row's fields (a field missing in some rows is NaN there)."""
    records: list[dict[str, Any]] = []
    for run_dir in find_runs(paths):
        run_cols = run_columns(run_dir)
        for row in _read_lines(run_dir / EDITS_FILE):
            records.append(_merge(run_cols, flatten(row), run_dir))
    return _frame(records)


def load_probes(paths: PathsLike) -> pd.DataFrame:
    """One row per probe row (``probes.jsonl``: a model state's score on one category) of every
    complete run under ``paths`` that probed: run-level columns, then the probe row's fields."""
    records: list[dict[str, Any]] = []
    for run_dir in find_runs(paths):
        if not (run_dir / PROBES_FILE).is_file():  # the run did not probe (eval.probes=none)
            continue
        run_cols = run_columns(run_dir)
        for row in _read_lines(run_dir / PROBES_FILE):
            records.append(_merge(run_cols, flatten(row), run_dir))
    return _frame(records)


def load_summaries(paths: PathsLike) -> pd.DataFrame:
    """One row per complete run under ``paths``: run-level columns, then the summary's metrics
    (nested mappings are flattened to dotted column names)."""
    records = []
    for run_dir in find_runs(paths):
        summary = _read_json(run_dir / SUMMARY_FILE)
        if not isinstance(summary, Mapping):
            raise DataError("summary is not a JSON object", file=str(run_dir / SUMMARY_FILE))
        records.append(_merge(run_columns(run_dir), flatten(summary), run_dir))
    return _frame(records)


def find_runs(paths: PathsLike) -> list[Path]:
    """Complete run folders found recursively under each path, in sorted order, no duplicates.

    Hidden folders (``.hydra``, ``.git``) are not searched. Folders that look like an unfinished
    run (a writer file but no ``summary.json``) are reported with ``warnings.warn``.
    """
    found: dict[Path, Path] = {}  # resolved -> as given, so overlapping paths count a run once
    incomplete: list[str] = []
    for root in _as_paths(paths):
        if not root.is_dir():
            raise FileNotFoundError(f"no such results folder: {root}")
        for folder in _walk(root):
            if RunWriter.is_complete(folder):
                found.setdefault(folder.resolve(), folder)
            elif _looks_like_run(folder):
                incomplete.append(str(folder))
    if incomplete:
        warnings.warn(f"skipping {len(incomplete)} incomplete run(s) without {SUMMARY_FILE} "
                      f"(crashed or still running): {', '.join(sorted(set(incomplete)))}",
                      stacklevel=3)
    return sorted(found.values())


def run_columns(run_dir: Path) -> dict[str, Any]:
    """The run-level columns of one run, read from its ``config.yaml`` (None where missing)."""
    config = _read_config(run_dir)
    cols: dict[str, Any] = {"run_dir": str(run_dir)}
    for name, key, default in RUN_COLUMNS:
        cols[name] = _lookup(config, key, default)
    return cols


def _as_paths(paths: PathsLike) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, _ in os.walk(root):
        # Sorted and pruned in place: deterministic order, and skip hidden folders.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(dirpath)


def _looks_like_run(folder: Path) -> bool:
    """A RunWriter was here: its edit files, or both config and meta (crash before any edit)."""
    present = {name for name in (PARTIAL_FILE, EDITS_FILE, CONFIG_FILE, META_FILE)
               if (folder / name).is_file()}
    return bool(present & {PARTIAL_FILE, EDITS_FILE}) or {CONFIG_FILE, META_FILE} <= present


def _read_config(run_dir: Path) -> Mapping[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        warnings.warn(f"{path} is missing; its run-level columns are None", stacklevel=4)
        return {}
    try:
        # resolve=False: an interpolation that cannot be resolved outside Hydra must not crash.
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # omegaconf/yaml raise many types; all mean a corrupt file
        raise DataError(f"cannot parse config: {err}", file=str(path)) from err
    return config if isinstance(config, Mapping) else {}


def _lookup(config: Mapping[str, Any], dotted: str, default: Any) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _read_lines(path: Path) -> Iterator[Mapping[str, Any]]:
    """The JSON objects of a run's JSON-lines file (``edits.jsonl``, ``probes.jsonl``)."""
    if not path.is_file():
        raise DataError(f"complete run has no {path.name}", file=str(path))
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON line: {err}", file=str(path), index=i) from err
            if not isinstance(row, Mapping):
                raise DataError("row is not a JSON object", file=str(path), index=i)
            yield row


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON: {err}", file=str(path)) from err


def _merge(run_cols: dict[str, Any], fields: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Run-level columns first; on a name clash the config's value wins (it is authoritative)."""
    clash = sorted(k for k in fields if k in run_cols and fields[k] != run_cols[k])
    if clash:
        warnings.warn(f"{run_dir}: fields {clash} differ from the run-level columns of the "
                      "same name; keeping the run-level values", stacklevel=4)
    return {**run_cols, **{k: v for k, v in fields.items() if k not in run_cols}}


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    if not records:  # keep the run-level columns so that groupby code works on empty results
        return pd.DataFrame(columns=list(RUN_COLUMN_NAMES))
    return pd.DataFrame(records)  # columns in order of first appearance
