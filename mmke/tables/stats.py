"""Statistics over seeds: per-seed values, mean ± std, and the paired t-test behind the papers'
significance claims."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from mmke.tables.runs import run_value

#: The seed of runs whose config has none: each such run counts as its own seed group.
_NO_SEED = "<none>"


@dataclass(frozen=True)
class Cell:
    """Our value of one table cell: mean and sample std (ddof=1) over seeds, and the number
    of seeds; mean is NaN with no run, std is NaN with fewer than two seeds."""

    mean: float = math.nan
    std: float = math.nan
    n: int = 0


def per_seed(runs: pd.DataFrame, metric: str,
             value: Callable[[pd.Series, str], float] = run_value) -> pd.Series:
    """``metric`` per seed (index), averaging runs that share a seed; runs without the metric
    are left out, so a seed with none of it does not appear. ``value`` reads one run's value
    (default :func:`mmke.tables.runs.run_value`)."""
    if runs.empty:
        return pd.Series(dtype=float)
    values = pd.Series([value(row, metric) for _, row in runs.iterrows()],
                       index=runs.index, dtype=float)
    seeds = runs["seed"] if "seed" in runs.columns else pd.Series(_NO_SEED, index=runs.index)
    seeds = seeds.astype(object).where(seeds.notna(), _NO_SEED)
    frame = pd.DataFrame({"seed": seeds, "value": values}).dropna(subset=["value"])
    if frame.empty:
        return pd.Series(dtype=float)
    return frame.groupby("seed", sort=False)["value"].mean()


def mean_std(values: pd.Series) -> Cell:
    """Mean and sample std (ddof=1) of per-seed values."""
    values = values.dropna()
    n = len(values)
    if n == 0:
        return Cell()
    std = float(values.std(ddof=1)) if n >= 2 else math.nan
    return Cell(float(values.mean()), std, n)


def paired_ttest(treated: pd.Series, baseline: pd.Series) -> float:
    """Two-sided p-value of ``scipy.stats.ttest_rel`` over the seeds both series have; NaN
    with fewer than two such seeds (or when scipy gives none, e.g. zero variance)."""
    common = treated.dropna().index.intersection(baseline.dropna().index)
    if len(common) < 2:
        return math.nan
    a = treated.loc[common].to_numpy(dtype=float)
    b = baseline.loc[common].to_numpy(dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant differences: scipy says why
        p = stats.ttest_rel(a, b).pvalue
    return float(p) if np.isfinite(p) else math.nan


def paired_difference(values: pd.Series, reference: pd.Series) -> Cell:
    """``values - reference``: over the seeds both have when there are any (mean ± std of the
    per-seed differences), else the difference of the two means (std NaN)."""
    values, reference = values.dropna(), reference.dropna()
    common = values.index.intersection(reference.index)
    if len(common):
        return mean_std(values.loc[common] - reference.loc[common])
    if values.empty or reference.empty:
        return Cell()
    return Cell(float(values.mean() - reference.mean()), math.nan, 0)
