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


def summarize_probes(rows: Sequence[dict]) -> dict:
    """General-capability probes in the summary: per category, ``accuracy`` (and MME's
    ``mme_score`` where the set has it) of the unedited model (``*_before``) and at the end of
    the streams (``*_end``: the last probe of each stream, mean over streams; absent for the
    single protocol, which probes before editing only)."""
    before = [r for r in rows if r["edits"] == 0]
    last: dict[object, int] = {}
    for r in rows:
        if r["stream"] is not None:
            last[r["stream"]] = max(last.get(r["stream"], 0), r["edits"])
    end = [r for r in rows if r["stream"] is not None and r["edits"] == last[r["stream"]]]
    out: dict = {}
    for name, chosen in (("before", before), ("end", end)):
        for field in ("accuracy", "mme_score"):
            by_category: dict[str, list] = {}
            for r in chosen:
                by_category.setdefault(r["category"], []).append(r.get(field))
            means = {c: _mean(v) for c, v in by_category.items()}
            if any(v is not None for v in means.values()):
                out[f"{field}_{name}"] = means
    return out


def probe_lines(probes: dict) -> list[str]:
    """The summary's probe accuracies as short lines for the console (before -> end)."""
    before, end = probes.get("accuracy_before", {}), probes.get("accuracy_end", {})
    lines = []
    for category in dict.fromkeys([*before, *end]):
        text = f"  {category}: {_fmt(before.get(category))}"
        if end:
            text += f" -> {_fmt(end.get(category))}"
        lines.append(text)
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


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
