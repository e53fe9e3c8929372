"""Aggregate per-edit rows into a run summary, and show it as a table."""

from __future__ import annotations

import math
import resource
from collections.abc import Sequence
from statistics import fmean

import pandas as pd

from mmke.evaluation.evaluator import METRICS
from mmke.evaluation.names import ALL_METRIC_LABELS, order_columns


def _finite(values: list) -> list:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: list) -> float | None:
    values = _finite(values)
    return fmean(values) if values else None


def _max(values: list) -> float | None:
    values = _finite(values)
    return max(values) if values else None


def metric_keys(rows: Sequence[dict]) -> list[str]:
    """The metric columns of ``rows``: the five of every run, then any extra metric (Port.,
    locality sets, greedy scores) that some row holds, in ``COLUMN_ORDER``."""
    extra = {k for r in rows for k in r if k in ALL_METRIC_LABELS and k not in METRICS}
    return list(METRICS) + order_columns(sorted(extra))


def summarize(rows: Sequence[dict], wall_s: float, eval_forwards: int) -> dict:
    """Metric means over successful edits (percent), counts, and cost."""
    ok = [r for r in rows if r["ok"]]
    summary: dict = {m: _mean([r.get(m) for r in ok]) for m in metric_keys(rows)}
    summary.update(n_edits=len(rows), n_failed=len(rows) - len(ok))
    summary["cost"] = {
        "edit_s": _mean([r["edit_s"] for r in rows]),
        "eval_s": _mean([r["eval_s"] for r in ok]),
        "steps": _mean([r["steps"] for r in rows]),
        "eval_forwards": eval_forwards,
        "eval_forwards_per_edit": eval_forwards / max(1, len(rows)),
        "wall_s": wall_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # per edit (mmke.cost): the highest peak, and the growth over the memory before edit 0
        "peak_mem_mb": _max([r.get("peak_mem_mb") for r in rows]),
        "incremental_mem_mb": _max([r.get("incremental_mem_mb") for r in rows]),
        "incremental_mem_mb_mean": _mean([r.get("incremental_mem_mb") for r in rows]),
    }
    return summary


def summary_table(summary: dict, label: str) -> pd.DataFrame:
    """One-row table with the papers' column names."""
    # the five always, unless the run scored generated answers only (eval.mode=generate)
    forced = any(summary.get(m) is not None for m in METRICS) or summary["n_edits"] == summary["n_failed"]
    keys = [m for m in ALL_METRIC_LABELS
            if m in summary and ((m in METRICS and forced) or summary[m] is not None)]
    row = {ALL_METRIC_LABELS[m]: summary[m] for m in order_columns(keys)}
    row["edits"] = summary["n_edits"]
    row["failed"] = summary["n_failed"]
    return pd.DataFrame([row], index=[label])
