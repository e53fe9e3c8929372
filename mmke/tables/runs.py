"""Runs as the table builders see them: one row per complete run, with its summary's metrics
(``load_summaries``) and its whole config flattened into ``config.<dotted key>`` columns, so a
published ``setting`` can be looked up in any run. :func:`is_leaky` reads the summary's flag of
a run whose edits saw the evaluated record's own prompts; the builders keep such runs apart.

:func:`run_value` gives one run's value of any table column: a stored metric, a derived one
(``gen``, ``avg``) or a cost (``memory_gb``), as ``mmke.evaluation.names`` defines them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from mmke.evaluation.names import ALL_METRIC_LABELS, COST_METRICS, DERIVED_METRICS
from mmke.results.load import PathsLike, load_runs, load_summaries
from mmke.results.run_folder import CONFIG_FILE
from mmke.tables.errors import NoRunsError

CONFIG_PREFIX = "config."
RunsLike = pd.DataFrame | PathsLike


def load_table_runs(paths: PathsLike) -> pd.DataFrame:
    """One row per complete run under ``paths``, with ``config.*`` columns.

    Raises ``NoRunsError`` when the folders hold no complete run, ``FileNotFoundError`` when
    a folder does not exist.
    """
    frame = load_summaries(paths)
    if frame.empty:
        shown = paths if isinstance(paths, (str, Path)) else ", ".join(map(str, paths))
        raise NoRunsError(f"no complete run folders (with summary.json) under {shown}")
    return with_configs(frame)


def as_runs(runs: RunsLike) -> pd.DataFrame:
    """A runs frame from a DataFrame (used as given; ``config.*`` columns are added from each
    ``run_dir`` when it has none) or from folders (:func:`load_table_runs`)."""
    if isinstance(runs, pd.DataFrame):
        has_config = any(str(c).startswith(CONFIG_PREFIX) for c in runs.columns)
        return runs if has_config or "run_dir" not in runs.columns else with_configs(runs)
    return load_table_runs(runs)


def as_edit_rows(runs: RunsLike) -> pd.DataFrame:
    """One row per edit: folders are read with ``load_runs``; a frame of per-edit rows (it has
    ``edit_s``) is used as given; a per-run frame is expanded through its ``run_dir``s."""
    if not isinstance(runs, pd.DataFrame):
        return load_runs(runs)
    if "edit_s" in runs.columns or "run_dir" not in runs.columns or runs.empty:
        return runs
    return load_runs(sorted(set(runs["run_dir"].astype(str))))


def with_configs(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus the flattened config of each row's ``run_dir`` as ``config.*`` columns."""
    configs = [_flat_config(Path(d)) for d in frame["run_dir"]]
    extra = pd.DataFrame(configs, index=frame.index)
    extra = extra[[c for c in extra.columns if c not in frame.columns]]
    return pd.concat([frame, extra], axis=1)


def config_value(run: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The first of the dotted config ``keys`` that ``run`` (a runs-frame row) has, else None."""
    for key in keys:
        value = run.get(CONFIG_PREFIX + key)
        if not _missing(value):
            return value
    return None


def is_leaky(run: Mapping[str, Any]) -> bool:
    """Whether a run's summary flags it ``leaky``: a setting let its edits see prompts scored
    for the edited record (``Regularizer.leak_summary``). Runs without the flag are not."""
    value = run.get("leaky")
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return not _missing(value) and bool(value)


def leaked_text(run: Mapping[str, Any]) -> str:
    """What a leaky run's edits saw, e.g. ``"t_gen,m_gen"`` (``""`` for a clean run)."""
    if not is_leaky(run):
        return ""
    value = run.get("leaked")
    if isinstance(value, (list, tuple)) and value:
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return "unknown"  # flagged leaky without saying what: still kept apart


def run_value(run: Mapping[str, Any], metric: str) -> float:
    """One run's value of table column ``metric`` (NaN when the run does not have it)."""
    if metric in ALL_METRIC_LABELS:
        return _number(run.get(metric))
    if metric in DERIVED_METRICS:
        return DERIVED_METRICS[metric].value(run)
    # An exact column first (``cost.memory_gb``), then the cost's documented sources.
    for source in (f"cost.{metric}", metric):
        if not _missing(run.get(source)):
            return _number(run.get(source))
    cost = COST_METRICS.get(metric)
    if cost is None:
        return math.nan
    for source in cost.sources:
        if not _missing(run.get(source)):
            value = _number(run.get(source)) * cost.scale
            if cost.per is None:
                return value
            per = _number(run.get(cost.per))
            return value / per if per and math.isfinite(per) else math.nan
    return math.nan


def _flat_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    out: dict[str, Any] = {}
    _flatten(container, CONFIG_PREFIX, out)
    return out


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            _flatten(value, f"{prefix}{key}.", out)
    else:
        # Lists are kept whole (as text) so a frame column holds one value per run.
        out[prefix[:-1]] = str(node) if isinstance(node, (list, tuple)) else node


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
